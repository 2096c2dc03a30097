"""``meminject serve --backend vllm``: the same HTTP API as the ``hf`` server, on vLLM's
async engine, with each request's memories inside vLLM's batch. One server (one vLLM
engine) for the module; the expected answers come from the ``hf`` backend in this
process."""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.vllm_tier.conftest import require_vllm_and_smollm2, running_server

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[2]
TOKYO = ROOT / "memories" / "smollm2-135m" / "tokyo-kath.toml"
PROMPT = "The city of Tokyo lies in the country of"
OCEAN = (
    "version = 1\n\n"
    '[[memory]]\nname = "ocean"\ntext = " ocean"\nlayer = 6\ntau = 4.0\nsite = "resid_post"\n\n'
    '[[memory]]\nname = "calm"\ntext = " calm"\nlayer = 12\ntau = 3.0\nsite = "attn_out"\n'
    'positions = "prompt"\n'
)
NEW = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "MEMINJECT_LOAD_PLUGINS": ""}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    require_vllm_and_smollm2()
    root = tmp_path_factory.mktemp("vserve")
    (root / "ocean.toml").write_text(OCEAN)
    port = free_port()
    log_path = root / "server.log"
    command = [
        sys.executable,
        "-m",
        "meminject.cli",
        "serve",
        "--model",
        "smollm2-135m",
        "-m",
        str(TOKYO),
        "-m",
        str(root / "ocean.toml"),
        "--backend",
        "vllm",
        "--port",
        str(port),
        "--served-name",
        "smol",
        "--log-level",
        "info",
    ]
    with running_server(command, env=_env(), port=port, log_path=log_path) as (
        process,
        base,
    ):
        yield {"base": base, "root": root, "process": process, "log": log_path}


@pytest.fixture(scope="module")
def local(served: dict[str, Any]) -> Iterator[Any]:
    from meminject.loading import load_model

    model = load_model("smollm2-135m", dtype="float32")
    yield model
    del model
    gc.collect()


def expected(local: Any, served: dict[str, Any], names: list[Any], prompt: str = PROMPT) -> Any:
    """The ``hf`` backend's greedy answer with the memories the request chose."""
    from meminject.generation import generate
    from meminject.loading import load_memories
    from meminject.memfile import MemoryChoice

    if not names:
        return generate(local, prompt, None, max_new_tokens=NEW)
    loaded = load_memories([str(TOKYO), str(served["root"] / "ocean.toml")])
    picked = [
        MemoryChoice(n["name"], n.get("tau")) if isinstance(n, dict) else MemoryChoice(n)
        for n in names
    ]
    return generate(local, prompt, loaded.choose(picked), max_new_tokens=NEW)


def post(served: dict[str, Any], body: dict[str, Any], path: str = "completions") -> httpx.Response:
    return httpx.post(f"{served['base']}/{path}", json=body, timeout=300)


def complete(served: dict[str, Any], memories: list[Any], prompt: str = PROMPT) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": NEW, "temperature": 0, "memories": memories}
    response = post(served, {**body, "logprobs": 0})
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_concurrent_requests_with_different_sets_each_get_the_hf_answer(
    served: dict[str, Any], local: Any
) -> None:
    choices: list[list[Any]] = [
        [],
        ["ocean"],
        ["tokyo-kath"],
        ["ocean", "calm", "tokyo-kath"],
        [{"name": "ocean", "tau": 8.0}],
        [],
        ["calm"],
        ["tokyo-kath"],
    ]
    with ThreadPoolExecutor(len(choices)) as pool:
        answers = list(pool.map(lambda names: complete(served, names), choices))
    texts = set()
    for names, answer in zip(choices, answers, strict=True):
        want = expected(local, served, names)
        got = answer["choices"][0]
        assert got["text"] == want.completion, names
        assert answer["usage"]["completion_tokens"] == len(want.new_tokens)
        assert answer["usage"]["prompt_tokens"] == len(want.prompt_tokens)
        texts.add(got["text"])
    assert len(texts) >= 4  # the memories change the answers


def test_streaming_and_chat(served: dict[str, Any], local: Any) -> None:
    body = {"prompt": PROMPT, "max_tokens": NEW, "temperature": 0, "memories": ["ocean"]}
    with httpx.stream(
        "POST", f"{served['base']}/completions", json={**body, "stream": True}, timeout=300
    ) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert text == expected(local, served, ["ocean"]).completion

    chat = post(
        served,
        {
            "messages": [{"role": "user", "content": "Name a large body of water."}],
            "max_tokens": NEW,
            "temperature": 0,
            "memories": ["ocean"],
        },
        "chat/completions",
    )
    assert chat.status_code == 200, chat.text
    from meminject.generation import generate
    from meminject.loading import load_memories

    memories = load_memories([str(served["root"] / "ocean.toml")]).subset(["ocean"])
    want = generate(
        local,
        [{"role": "user", "content": "Name a large body of water."}],  # type: ignore[arg-type]
        memories,
        max_new_tokens=NEW,
    )
    assert chat.json()["choices"][0]["message"]["content"] == want.completion


def test_bad_requests_get_the_same_errors(served: dict[str, Any]) -> None:
    unknown = post(served, {"prompt": PROMPT, "max_tokens": 2, "memories": ["nope"]})
    assert unknown.status_code == 400
    assert unknown.json()["error"]["code"] == "unknown_memory"
    twice = post(served, {"prompt": PROMPT, "max_tokens": 2, "memories": ["ocean", "ocean"]})
    assert twice.status_code == 400
    huge = post(
        served,
        {"prompt": PROMPT, "max_tokens": 2, "memories": [{"name": "ocean", "tau": 1e300}]},
    )
    assert huge.status_code == 400 and "not finite" in huge.json()["error"]["message"]
    listed = httpx.get(f"{served['base']}/memories").json()["data"]
    assert sorted(m["name"] for m in listed) == ["calm", "ocean", "tokyo-kath"]
    # the server is still whole
    assert post(served, {"prompt": PROMPT, "max_tokens": 2}).status_code == 200


def test_a_client_that_leaves_mid_stream_ends_its_vllm_request(served: dict[str, Any]) -> None:
    body = {"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "memories": ["ocean"]}
    body["stream"] = True
    with httpx.stream("POST", f"{served['base']}/completions", json=body, timeout=300) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # one chunk, then the client is gone
    deadline = time.monotonic() + 120
    while "cancelled (client gone)" not in served["log"].read_text():
        assert time.monotonic() < deadline, served["log"].read_text()[-3000:]
        time.sleep(0.5)
    line = next(
        ln for ln in served["log"].read_text().splitlines() if "cancelled (client gone)" in ln
    )
    assert int(line.split("after ")[1].split(" ")[0]) < 400  # aborted, not run to the end
    assert post(served, {"prompt": PROMPT, "max_tokens": 2}).status_code == 200


def test_memories_vllm_cannot_run_stop_the_server_before_vllm_starts(tmp_path: Path) -> None:
    require_vllm_and_smollm2()
    (tmp_path / "set.toml").write_text(
        "version = 1\n\n"
        '[[memory]]\nname = "fine"\ntext = " Paris"\nlayer = 3\ntau = 2.0\n\n'
        '[[memory]]\nname = "gate-z"\nstrategy = "gated"\nsite = "attn_z"\nlayer = 2\n'
        'tensors = "never-read.safetensors"\nboundary = 0.3\n'
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "meminject.cli",
            "serve",
            "--model",
            "smollm2-135m",
            "-m",
            str(tmp_path),
            "--backend",
            "vllm",
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "'gate-z'" in errors[0] and "attn_z" in errors[0]
    assert "EngineCore" not in done.stderr
