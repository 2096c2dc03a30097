"""``meminject serve`` as a real server process on a loopback port, talked to with the
official ``openai`` client and with raw HTTP: per-request memories answer exactly as
in-process generation does, concurrent requests with different sets each get their
own answer, streaming joins to the same text, and every bad request gets an
OpenAI-style JSON error without taking the server down."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from meminject.generation import generate
from meminject.loading import load_model
from tests.conftest import write

pytestmark = pytest.mark.integration

KEY = "sk-meminject-test"
PROMPT = "The first president of the United States fought in the"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MEMORIES = (
    'version = 1\n[[memory]]\nname = "paris"\ntext = "Paris Rome"\nlayer = 1\n'
    'site = "resid_pre"\ntau = 5.0\n[[memory]]\nname = "london"\ntext = "London"\n'
    'layer = 0\nsite = "mlp_out"\ntau = 6.0\n'
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(model_dirs, tmp_path_factory):
    """A server over the tiny Llama (given a chat template), with two memories."""
    import shutil

    root = tmp_path_factory.mktemp("serve")
    directory = root / "llama"
    shutil.copytree(model_dirs["llama"], directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    memories = write(root / "memories.toml", MEMORIES)
    process, base = start_server(
        root,
        directory,
        memories,
        "--api-key",
        KEY,
        "--served-name",
        "tiny",
        "--batch-wait-ms",
        "200",
        "--batch-size",
        "4",
    )
    yield {"base": base, "dir": directory, "memories": memories, "process": process}
    process.terminate()
    process.wait(timeout=30)


def start_server(root, directory, memories, *flags):
    """``meminject serve`` in a child process on a free port, once it answers."""
    port = free_port()
    log_path = root / f"server-{port}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meminject.cli",
                "serve",
                "--model",
                str(directory),
                "-m",
                str(memories),
                "--port",
                str(port),
                *flags,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
        )
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{base}/models", headers=auth()).status_code == 200:
                return process, base
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(log_path.read_text())
        time.sleep(0.3)


@pytest.fixture(scope="module")
def local(served):
    """The same checkpoint in this process, for the expected answers."""
    model = load_model(served["dir"])
    return model


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def client(served):
    from openai import OpenAI

    return OpenAI(base_url=served["base"], api_key=KEY, max_retries=0)


def complete(served, memories, max_tokens=6, **kw):
    """A greedy completion of PROMPT through the official client."""
    return client(served).completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"memories": memories},
        **kw,
    )


def expected(local, served, prompt, names, max_tokens=6, **kw):
    from meminject.loading import load_memories

    memories = load_memories([served["memories"]]).subset(names) if names else None
    return generate(local, prompt, memories, max_new_tokens=max_tokens, **kw)


def test_models_and_memories_are_listed(served):
    models = client(served).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    listed = httpx.get(f"{served['base']}/memories", headers=auth()).json()["data"]
    assert [(m["name"], m["site"], m["layer"], m["tau"]) for m in listed] == [
        ("paris", "resid_pre", 1, 5.0),
        ("london", "mlp_out", 0, 6.0),
    ]


def test_per_request_memories_answer_as_generate_does(served, local):
    answers = {}
    for names in ([], ["paris"], ["paris", "london"]):
        reply = complete(served, names)
        want = expected(local, served, PROMPT, names)
        assert reply.choices[0].text == want.completion, names
        assert reply.usage.completion_tokens == len(want.new_tokens)
        assert reply.usage.prompt_tokens == len(want.prompt_tokens)
        answers[tuple(names)] = reply.choices[0].text
    assert len(set(answers.values())) == 3  # each set changes the answer


def test_a_request_can_override_tau(served, local):

    reply = complete(served, [{"name": "paris", "tau": 1.5}], max_tokens=5)
    table = {"name": "paris", "text": "Paris Rome", "layer": 1, "site": "resid_pre", "tau": 1.5}
    want = generate(local, PROMPT, [table], max_new_tokens=5)
    assert reply.choices[0].text == want.completion


def test_streaming_joins_to_the_same_text(served, local):
    chunks = list(complete(served, ["london"], stream=True, stream_options={"include_usage": True}))
    *chunks, last = chunks
    want_tokens = len(expected(local, served, PROMPT, ["london"]).new_tokens)
    assert last.choices == [] and last.usage.completion_tokens == want_tokens
    parts = [(c.choices[0].text, c.choices[0].finish_reason) for c in chunks]
    assert (
        "".join(text for text, _ in parts) == expected(local, served, PROMPT, ["london"]).completion
    )
    assert parts[-1][1] == "length" and len(parts) >= 3


def test_chat_streaming_and_logprobs(served, local):
    def chat(**kw):
        return client(served).chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Where is Paris?"}],
            max_tokens=4,
            temperature=0,
            extra_body={"memories": ["paris"]},
            **kw,
        )

    reply = chat(logprobs=True, top_logprobs=2)
    want = expected(local, served, "Where is Paris?", ["paris"], max_tokens=4, chat=True)
    assert reply.choices[0].message.content == want.completion
    steps = reply.choices[0].logprobs.content
    assert len(steps) == 4 and all(len(s.top_logprobs) == 2 for s in steps)
    assert steps[0].top_logprobs[0].logprob >= steps[0].top_logprobs[1].logprob
    streamed = chat(stream=True)
    deltas = [c.choices[0].delta for c in streamed]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == want.completion


def test_concurrent_requests_with_different_sets_each_get_their_own(served, local):
    sets = [[], ["paris"], ["london"], ["paris", "london"]]

    def ask(names):
        reply = httpx.post(
            f"{served['base']}/completions",
            json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "memories": names},
            headers=auth(),
            timeout=120,
        )
        return reply.json()["choices"][0]["text"]

    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(ask, sets))
    assert got == [expected(local, served, PROMPT, names).completion for names in sets]


@pytest.mark.parametrize(
    ("body", "headers", "status", "param"),
    [
        ({"prompt": "x", "memories": ["nope"]}, None, 400, "memories"),
        ({"prompt": "x", "bogus": 1}, None, 400, "bogus"),
        ({"prompt": "x", "temperature": -1}, None, 400, "temperature"),
        ({"prompt": "x", "model": "other"}, None, 404, "model"),
        ({"prompt": "x " * 400}, None, 413, None),
        ({"prompt": "x"}, {}, 401, None),
        ({"prompt": "x"}, {"Authorization": "Bearer wrong"}, 401, None),
    ],
)
def test_bad_requests_get_openai_errors(served, body, headers, status, param):
    reply = httpx.post(
        f"{served['base']}/completions",
        json=body,
        headers=auth() if headers is None else headers,
        timeout=60,
    )
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["message"] and error["type"]
    assert error["param"] == param
    assert served["process"].poll() is None  # still serving


def test_malformed_json_and_unknown_routes(served):
    bad = httpx.post(f"{served['base']}/completions", content=b"{nope", headers=auth())
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    missing = httpx.get(f"{served['base']}/nothing", headers=auth())
    assert missing.status_code == 404 and "error" in missing.json()
    assert httpx.get(f"{served['base']}/models", headers=auth()).status_code == 200


def test_a_client_that_leaves_mid_stream_frees_its_row(served):
    """Close a long stream after its first event; the server must go on answering."""
    with httpx.stream(
        "POST",
        f"{served['base']}/completions",
        json={"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "stream": True},
        headers=auth(),
        timeout=60,
    ) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                break
    start = time.monotonic()
    reply = httpx.post(
        f"{served['base']}/completions",
        json={"prompt": "Hello", "max_tokens": 2, "temperature": 0},
        headers=auth(),
        timeout=120,
    )
    assert reply.status_code == 200
    assert time.monotonic() - start < 60


def test_bad_memory_files_stop_the_server_before_it_listens(model_dirs, tmp_path):
    bad = write(tmp_path / "bad.toml", 'version = 1\n[[memory]]\nname = "x"\ntext = "y"\n')
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "meminject.cli",
            "serve",
            "--model",
            str(model_dirs["llama"]),
            "-m",
            str(bad),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "bad.toml" in done.stderr and "layer" in done.stderr
    assert "serving" not in done.stderr


def test_a_full_queue_answers_503_and_the_rest_are_served(served, tmp_path):
    """One request at a time and one waiting: of eight sent at once, the ones that find
    the queue full get 503 (code queue_full); every other gets its answer."""
    process, base = start_server(
        tmp_path,
        served["dir"],
        served["memories"],
        "--batch-size",
        "1",
        "--batch-wait-ms",
        "0",
        "--max-queue",
        "1",
    )

    def ask(_: int) -> httpx.Response:
        body = {"prompt": PROMPT, "max_tokens": 60, "temperature": 0}
        return httpx.post(f"{base}/completions", json=body, timeout=120)

    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            replies = list(pool.map(ask, range(8)))
        codes = sorted(r.status_code for r in replies)
        assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, codes
        full = next(r for r in replies if r.status_code == 503).json()["error"]
        assert full["code"] == "queue_full"
        assert httpx.get(f"{base}/models").status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=30)
