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
    # "far": paris's direction at 10 residual norms, so a request can stack the two
    # past float32's range at one site while each τ·v alone is finite.
    '[[memory]]\nname = "far"\ntext = "Paris Rome"\nlayer = 1\nsite = "resid_pre"\n'
    'tau = 1.0\ntau_units = "resid_norm"\nresid_norm = 10.0\n'
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
        "--log-level",
        "info",
    )
    log = root / f"server-{base.rsplit(':', 1)[1].split('/')[0]}.log"
    yield {"base": base, "dir": directory, "memories": memories, "process": process, "log": log}
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


def json_auth() -> dict[str, str]:
    return {**auth(), "Content-Type": "application/json"}


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
        ("far", "resid_pre", 1, 1.0),
    ]
    # The file relative to the -m path it came from: the server's own paths stay its own.
    assert {m["file"] for m in listed} == {"memories.toml"}


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
        # Issue 26: a name twice (conflicting overrides decided by order; one null and
        # one set override crashed with TypeError), and a list longer than the set.
        ({"prompt": "x", "memories": ["paris", "paris"]}, None, 400, "memories"),
        (
            {"prompt": "x", "memories": [{"name": "paris", "tau": 1}, {"name": "paris", "tau": 2}]},
            None,
            400,
            "memories",
        ),
        (
            {"prompt": "x", "memories": ["paris", {"name": "paris", "tau": 2}]},
            None,
            400,
            "memories",
        ),
        ({"prompt": "x", "memories": ["paris"] * 10_000}, None, 400, "memories"),
        # τ·v not finite: refused before the request is queued, without the file's path.
        ({"prompt": "x", "memories": [{"name": "paris", "tau": 1e308}]}, None, 400, "memories"),
        ({"prompt": "x", "memories": [{"name": "paris", "tau": -1e39}]}, None, 400, "memories"),
        # Strict types: no "yes" for a boolean, no true or 1.5 for an integer.
        ({"prompt": "x", "stream": "yes"}, None, 400, "stream"),
        ({"prompt": "x", "max_tokens": True}, None, 400, "max_tokens"),
        ({"prompt": "x", "max_tokens": 1.5}, None, 400, "max_tokens"),
        ({"prompt": "x", "memories": [{"name": "paris", "enabled": "no"}]}, None, 400, None),
        # Bounded stop lists.
        ({"prompt": "x", "stop": ["a"] * 100_000}, None, 400, "stop"),
        ({"prompt": "x", "stop": "a" * 10_000}, None, 400, "stop"),
        # Options not implemented: only their neutral value.
        ({"prompt": "x", "presence_penalty": 0.5}, None, 400, "presence_penalty"),
        ({"prompt": "x", "frequency_penalty": -1}, None, 400, "frequency_penalty"),
        ({"prompt": "x", "response_format": {"type": "json_object"}}, None, 400, None),
        # Far longer than the context: refused before tokenizing.
        ({"prompt": "x" * 500_000}, None, 413, None),
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
    if param is not None or status != 400:
        assert error["param"] == param
    assert len(error["message"]) < 1000  # nothing a request sent is echoed in bulk
    assert str(served["dir"].parent) not in error["message"]  # nor the server's paths
    assert "Error" not in error["message"]  # nor exception names
    assert served["process"].poll() is None  # still serving


def test_malformed_json_and_unknown_routes(served):
    bad = httpx.post(f"{served['base']}/completions", content=b"{nope", headers=json_auth())
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
        full = next(r for r in replies if r.status_code == 503)
        assert full.json()["error"]["code"] == "queue_full"
        assert full.headers["Retry-After"] == "1"
        assert httpx.get(f"{base}/models").status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=30)


# -- issue 26: the server under attack and under load ---------------------------------


def post(served, body, path="completions", headers=None, **kw):
    return httpx.post(
        f"{served['base']}/{path}",
        json=body,
        headers=json_auth() if headers is None else headers,
        timeout=kw.pop("timeout", 120),
        **kw,
    )


def greedy(prompt, memories=(), max_tokens=6, **kw):
    return {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "memories": memories,
        **kw,
    }


def test_neutral_values_of_unsupported_options_are_accepted(served, local):
    """Issue 29 §5: clients send presence_penalty 0, frequency_penalty 0 and
    response_format text; those change nothing, so they are served."""
    reply = complete(
        served,
        ["paris"],
        presence_penalty=0,
        frequency_penalty=0.0,
    )
    assert reply.choices[0].text == expected(local, served, PROMPT, ["paris"]).completion
    chat = client(served).chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Where is Paris?"}],
        max_tokens=3,
        temperature=0,
        presence_penalty=0,
        frequency_penalty=0,
        response_format={"type": "text"},
    )
    want = expected(local, served, "Where is Paris?", [], max_tokens=3, chat=True)
    assert chat.choices[0].message.content == want.completion


def test_bodies_are_capped(served):
    """Item 1: a body over 1 MiB is refused by its Content-Length, and one sent in
    chunks without a length is refused as it streams; other routes go on answering."""
    big = json.dumps({"prompt": "x", "user": "u" * (2 << 20)}).encode()
    declared = httpx.post(f"{served['base']}/completions", content=big, headers=json_auth())
    assert declared.status_code == 413, declared.text
    assert declared.json()["error"]["code"] == "request_too_large"

    def chunks():
        for start in range(0, len(big), 64 << 10):
            yield big[start : start + (64 << 10)]

    streamed = httpx.post(f"{served['base']}/completions", content=chunks(), headers=json_auth())
    assert streamed.status_code == 413, streamed.text
    assert httpx.get(f"{served['base']}/models", headers=auth()).status_code == 200


def test_hosts_origins_and_content_types_are_checked(served):
    """Item 8: DNS rebinding (a foreign Host), cross-site requests (a foreign Origin,
    a body that is not declared JSON) are refused on every route."""
    body = json.dumps(greedy("Hello", max_tokens=1)).encode()
    url = f"{served['base']}/completions"
    rebound = httpx.get(f"{served['base']}/models", headers={**auth(), "Host": "evil.example"})
    assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "untrusted_host"
    foreign = httpx.post(
        url, content=body, headers={**json_auth(), "Origin": "http://evil.example"}
    )
    assert foreign.status_code == 403 and foreign.json()["error"]["code"] == "forbidden_origin"
    for kind in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {**auth(), **({"Content-Type": kind} if kind else {})}
        reply = httpx.post(url, content=body, headers=headers)
        assert reply.status_code == 415, (kind, reply.text)
    port = served["base"].split(":")[2].split("/")[0]
    same = httpx.post(
        url,
        content=body,
        headers={
            **json_auth(),
            "Host": f"localhost:{port}",
            "Origin": f"http://localhost:{port}",
            "Content-Type": "application/json; charset=utf-8",
        },
    )
    assert same.status_code == 200, same.text


def test_auth_details(served):
    """Low items: the scheme in any case, WWW-Authenticate on 401."""
    body = greedy("Hello", max_tokens=1)
    lower = post(served, body, headers={"Authorization": f"bearer {KEY}"})
    assert lower.status_code == 200, lower.text
    missing = post(served, body, headers={"Content-Type": "application/json"})
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")


def test_an_empty_api_key_is_an_error(model_dirs, tmp_path):
    """An empty MEMINJECT_API_KEY must not mean "no auth"."""
    done = subprocess.run(
        [sys.executable, "-m", "meminject.cli", "serve", "--model", str(model_dirs["llama"])],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MEMINJECT_API_KEY": ""},
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "Error: MEMINJECT_API_KEY is empty; set a key, or unset it to serve without one"
    ]


def test_nested_json_is_a_400(served):
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"prompt": "x", "stop": ' + b"[" * 50_000):
        reply = httpx.post(f"{served['base']}/completions", content=raw, headers=json_auth())
        assert reply.status_code == 400, reply.text[:200]
        assert "Recursion" not in reply.text


def hostile_taus(local, served):
    """τ for "far" and "paris" whose τ·v are each finite in float32 but whose sum at
    their shared site is not: the scores of a row with both turn non-finite."""
    import torch

    from meminject.engine import added_scales
    from meminject.loading import load_memories

    scales = added_scales(local, load_memories([served["memories"]]))
    biggest = torch.finfo(torch.float32).max
    return [
        {"name": "far", "tau": 0.999 * biggest / scales["far"]},
        {"name": "paris", "tau": 0.99 * biggest},
    ]


def test_a_hostile_request_does_not_touch_its_batch_mates(served, local):
    """Item 2: requests whose memories overflow (scores non-finite during generation)
    or are refused (τ·v not finite) batched with normal ones: each hostile one fails
    alone with a 400, and the normal ones answer exactly as they do alone."""
    hostile = hostile_taus(local, served)
    normal = [[], ["paris"], ["london"]]
    bodies = [greedy(PROMPT, names) for names in normal]
    bodies += [greedy(PROMPT, hostile), greedy("Hello", hostile, stream=True)]
    bodies += [greedy(PROMPT, [{"name": "paris", "tau": -1e30}])]
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        replies = list(pool.map(lambda body: post(served, body), bodies))
    for names, reply in zip(normal, replies, strict=False):
        assert reply.status_code == 200, reply.text
        want = expected(local, served, PROMPT, names).completion
        assert reply.json()["choices"][0]["text"] == want, names
    for reply in replies[3:5]:
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["code"] == "non_finite_scores" and error["param"] == "memories"
    assert replies[5].status_code in (200, 400)  # its own answer, whatever it is


def test_a_short_request_is_answered_when_its_row_ends(served):
    """Item 7: a 1-token request batched with a 100-token stream gets its answer while
    the stream is still sending (it used to wait for the batch's longest row)."""
    seen: list[str] = []

    def long_stream() -> None:
        with httpx.stream(
            "POST",
            f"{served['base']}/completions",
            json=greedy("Hello", max_tokens=100, stream=True),
            headers=json_auth(),
            timeout=120,
        ) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    seen.append(line)

    def short() -> int:
        time.sleep(0.05)  # joins the stream's batch (the server waits 200 ms)
        reply = post(served, greedy("Hello", max_tokens=1))
        assert reply.status_code == 200
        return len(seen)

    with ThreadPoolExecutor(max_workers=2) as pool:
        streaming = pool.submit(long_stream)
        events_before_short = pool.submit(short).result()
        streaming.result()
    assert seen[-1] == "data: [DONE]" and len(seen) > 90
    assert events_before_short < len(seen) - 20


def test_a_plain_request_is_cancelled_when_its_client_leaves(served):
    """Item 6: a non-streaming request whose client disconnects is cancelled (the
    server logs it) rather than generated to the end for nobody."""
    port = int(served["base"].split(":")[2].split("/")[0])
    marker = f"Leaving {time.monotonic_ns()}"
    body = json.dumps(greedy(marker, max_tokens=100)).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head + body)
        time.sleep(0.05)  # the request is read, and waits 200 ms for batch mates
    deadline = time.monotonic() + 60
    while "cancelled (client gone)" not in served["log"].read_text():
        assert time.monotonic() < deadline, served["log"].read_text()[-2000:]
        time.sleep(0.1)
    assert post(served, greedy("Hello", max_tokens=1)).status_code == 200


def test_a_stream_that_fails_before_its_first_token_gets_the_status_of_a_plain_one(served, local):
    """Low item: streamed errors use the same status and type as non-streamed ones."""
    hostile = hostile_taus(local, served)
    plain = post(served, greedy("Hello", hostile))
    streamed = post(served, greedy("Hello", hostile, stream=True))
    assert plain.status_code == streamed.status_code == 400
    assert plain.json()["error"]["code"] == streamed.json()["error"]["code"]


def test_internal_errors_name_a_request_id_not_the_exception():
    from meminject.serve.app import api_error

    error = api_error(RuntimeError("/secret/path exploded"), "req-1234")
    assert error.status == 500
    message = error.body["error"]["message"]
    assert "req-1234" in message and "RuntimeError" not in message and "/secret" not in message


def test_compiled_choices_are_bounded(served, local):
    """Item 3: 500 distinct τ overrides through the server's own path (choose, key,
    compile) keep at most CACHE_SIZE compiled choices, and the process's RSS grows by
    less than a set bound."""
    import resource

    from meminject.loading import load_memories
    from meminject.serve.app import Server
    from meminject.serve.batcher import CACHE_SIZE, Batcher
    from meminject.serve.protocol import MemoryChoice

    memory_set = load_memories([served["memories"]])
    batcher = Batcher(local)
    server = Server(local, memory_set, batcher, served_name="tiny")
    try:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        for i in range(500):
            choice = [MemoryChoice(name="paris", tau=1.0 + i / 1000), "london"]
            chosen, key = server.memories(choice)
            batcher.compile(key, chosen)
        assert len(batcher._compiled) <= CACHE_SIZE
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss
        assert grown < 50 * 1024, f"RSS grew {grown} KiB"
        # One choice spelled two ways is one entry.
        a = server.memories(["paris", "london"])[1]
        b = server.memories([MemoryChoice(name="london"), MemoryChoice(name="paris", tau=5.0)])[1]
        assert a == b
    finally:
        batcher.close()


# -- a fuzzed API ---------------------------------------------------------------------


def _requests():
    """(route, body) pairs: valid bodies of each route with fuzzed memory choices and
    at most one field replaced by any JSON value, and bodies far from the API (any
    JSON, any bytes)."""
    from hypothesis import strategies as st

    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.floats(allow_nan=False)
        | st.text(max_size=40)
    )
    anything = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=12,
    )
    names = st.sampled_from(["paris", "london", "far", "nope", ""])
    taus = (
        st.none() | st.floats(allow_nan=False) | st.integers(-(2**70), 2**70) | st.text(max_size=3)
    )
    choice = names | st.fixed_dictionaries(
        {"name": names},
        optional={"tau": taus, "enabled": st.booleans() | st.none() | st.integers(0, 1)},
    )
    valid = {
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0.01, 1),
        "stop": st.lists(st.text(min_size=1, max_size=4), max_size=3),
        "seed": st.integers(0, 2**64 - 1),
        "stream": st.booleans(),
        "presence_penalty": st.just(0),
        "response_format": st.just({"type": "text"}),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    }
    fields = [*valid, "logprobs", "model", "n", "bogus", "prompt", "messages", "max_tokens"]
    broken = st.dictionaries(st.sampled_from([*fields, "memories"]), anything, max_size=1)
    messages = st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["user", "system", "assistant", "tool"]),
                "content": st.text(max_size=30),
            }
        ),
        min_size=1,
        max_size=3,
    )
    base = {"max_tokens": st.integers(0, 8), "memories": st.lists(choice, max_size=4)}
    completion = st.tuples(
        st.just("completions"),
        st.fixed_dictionaries({**base, "prompt": st.text(max_size=60)}, optional=valid),
        broken,
    )
    chat = st.tuples(
        st.just("chat/completions"),
        st.fixed_dictionaries({**base, "messages": messages}, optional=valid),
        broken,
    )
    near = (completion | chat).map(
        lambda parts: (parts[0], json.dumps({**parts[1], **parts[2]}).encode())
    )
    routes = st.sampled_from(["completions", "chat/completions"])
    far = st.tuples(
        routes, anything.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=200)
    )
    return near | near | far


def test_fuzzed_bodies_get_a_json_4xx_or_a_200_and_the_server_stays_right(served, local):
    """Any body, on either route: a JSON error 4xx or a 200, never a 5xx or a hang; and
    afterwards an ordinary request gets exactly its ordinary answer."""
    from hypothesis import HealthCheck, given, settings

    @settings(
        max_examples=150,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(request=_requests())
    def check(request: tuple[str, bytes]) -> None:
        route, body = request
        reply = httpx.post(
            f"{served['base']}/{route}", content=body, headers=json_auth(), timeout=60
        )
        assert reply.status_code == 200 or 400 <= reply.status_code < 500, reply.text
        if reply.status_code != 200:
            error = reply.json()["error"]
            assert isinstance(error["message"], str) and error["type"]
        elif "text/event-stream" not in reply.headers.get("content-type", ""):
            assert reply.json()["choices"]

    check()
    reply = complete(served, ["paris"])
    assert reply.choices[0].text == expected(local, served, PROMPT, ["paris"]).completion


def test_a_job_that_fails_in_the_worker_fails_alone(served, local):
    """Item 2, in the batcher itself (past the handlers' checks): a choice that does not
    compile fails its own job only, and a job that makes the whole batch raise (here a
    prompt over the context) is found by rerunning the batch one job at a time."""
    import asyncio

    from meminject.generation import DecodeOptions
    from meminject.loading import load_memories
    from meminject.memfile import MemoryChoice
    from meminject.serve.batcher import Batcher, Job

    memory_set = load_memories([served["memories"]])
    unfit = memory_set.choose([MemoryChoice("paris", tau=1e39)])  # τ·v overflows: no compile
    normal = memory_set.choose([MemoryChoice("paris")])
    options = DecodeOptions(max_new_tokens=3)
    batcher = Batcher(local, batch_size=4, wait_s=0.5)

    async def run() -> list[object]:
        loop = asyncio.get_running_loop()
        jobs = [
            Job(PROMPT, normal, normal.choice_key(), options, loop),
            Job(PROMPT, unfit, unfit.choice_key(), options, loop),
            Job("x " * 400, None, (), options, loop),
            Job(PROMPT, None, (), options, loop),
        ]
        for job in jobs:
            batcher.submit(job)
        return await asyncio.gather(*(job.done for job in jobs), return_exceptions=True)

    try:
        got = asyncio.run(run())
    finally:
        batcher.close()
    want = [expected(local, served, PROMPT, names, max_tokens=3) for names in (["paris"], [])]
    assert [got[0].new_tokens, got[3].new_tokens] == [w.new_tokens for w in want]
    assert "τ·v is not finite" in str(got[1])
    assert "longer than the model's context" in str(got[2])


def test_a_body_that_does_not_arrive_in_time_is_a_408(monkeypatch):
    """Low item (timeouts): a client that declares a body and never sends it holds its
    handler for at most BODY_TIMEOUT_S (shortened here), then gets 408."""
    import asyncio

    from starlette.requests import Request

    from meminject.serve import app as app_module
    from meminject.serve.protocol import APIError

    monkeypatch.setattr(app_module, "BODY_TIMEOUT_S", 0.2)
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/completions",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")],
    }

    async def receive() -> dict:
        await asyncio.sleep(3600)  # the body never comes
        return {}

    async def run() -> APIError:
        with pytest.raises(APIError) as caught:
            await app_module.read_body(Request(scope, receive))
        return caught.value

    error = asyncio.run(run())
    assert error.status == 408 and error.body["error"]["code"] == "timeout"
