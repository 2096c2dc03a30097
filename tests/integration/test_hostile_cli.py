"""Hostile command-line input to the model-loading commands: generation options, devices,
model names, pickled weights, non-finite memories, flag placement. Each case is one clean
line and exit code 2 (bad input), unless it is a runtime failure (exit 1)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from meminject.cli import cli, main
from tests.conftest import write

pytestmark = pytest.mark.integration

PROMPT = "The country that uses the greilek is located in"
MEMORY = "memories/toyworld/two-hop/rechelur.toml"
ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in output, output
    return errors[0]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--temperature", "nan"], "temperature must be a finite number >= 0, not nan"),
        (["--temperature", "inf"], "temperature must be a finite number >= 0, not inf"),
        (["--seed", str(2**64)], "--seed"),
        (["--seed", "-1"], "--seed"),
        (["--top-k", "5000"], "top_k must be between 0 and the vocabulary size"),
        (["--show-top", "5000"], "show_top must be between 0 and the vocabulary size"),
        (["--top-p", "0"], "--top-p"),
        (["--repetition-penalty", "0"], "--repetition-penalty"),
        (["--device", "quantum"], "unknown device 'quantum'"),
        (["--device", "cuda:3"], "device 'cuda:3' was asked for"),
        (["--threads", "0"], "--threads"),
    ],
)
def test_generation_options_are_refused_cleanly(option: list[str], message: str) -> None:
    code, output = run("generate", *option, "--max-new-tokens", "2", PROMPT)
    assert code == 2, output
    # One "Error:" line, also for values click refuses (not its usage block).
    assert message in one_error_line(output)
    assert "Usage:" not in output


def test_a_tiny_temperature_samples_the_greedy_token() -> None:
    greedy = run("generate", "--json", "--max-new-tokens", "4", PROMPT)
    tiny = run(
        "generate",
        "--json",
        "--temperature",
        "1e-30",
        "--seed",
        str(2**64 - 1),
        "--max-new-tokens",
        "4",
        PROMPT,
    )
    assert greedy[0] == tiny[0] == 0, tiny[1]
    tokens = [json.loads(out)["new_tokens"] for _, out in (greedy, tiny)]
    assert tokens[0] == tokens[1]


def test_a_prompt_that_is_not_utf8_is_refused() -> None:
    # What click passes on for bytes from the shell that are not UTF-8 (surrogateescape).
    code, output = run("generate", "--max-new-tokens", "1", "Paris is in \udcff")
    assert code == 2
    assert "the prompt is not valid UTF-8" in one_error_line(output)


def test_tau_that_overflows_the_dtype_is_refused_naming_the_memory(tmp_path: Path) -> None:
    path = write(
        tmp_path / "huge.toml",
        'version = 1\n[[memory]]\nname = "huge"\ntext = "Rechelur"\nlayer = 1\ntau = 1e39\n',
    )
    code, output = run("generate", "--json", "-m", str(path), PROMPT)
    assert code == 2
    line = one_error_line(output)
    assert "memory 'huge'" in line and "field 'tau'" in line and "not finite in float32" in line


def test_json_output_is_strict_json() -> None:
    code, output = run(
        "generate", "--json", "--compare", "-m", MEMORY, "--max-new-tokens", "2", PROMPT
    )
    assert code == 0

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    baseline, injected = (json.loads(x, parse_constant=refuse) for x in output.splitlines())
    assert baseline["memories"] == []
    assert injected["top_next"][0]["token"] == " Soveisica"


def test_a_mistyped_model_name_suggests_the_registered_one_at_once() -> None:
    start = time.perf_counter()
    code, output = run("generate", "--model", "toyworl", PROMPT)
    assert code == 2
    assert one_error_line(output) == (
        "Error: no model named 'toyworl'; did you mean 'toyworld'? (see meminject models)"
    )
    assert time.perf_counter() - start < 5


def test_an_unreachable_hub_fails_fast_and_says_how_to_work_offline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A closed port on the loopback interface stands for a hub that cannot be reached.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    code, output = run("generate", "--model", "some-org/some-model", PROMPT)
    assert code == 2
    line = one_error_line(output)
    assert "could not download 'some-org/some-model': the Hugging Face hub is unreachable" in line
    assert "HF_HUB_OFFLINE=1" in line
    assert time.perf_counter() - start < 10


def test_pickled_weights_are_refused_without_the_flag(gpt2_dir: Path, tmp_path: Path) -> None:
    import shutil

    model = tmp_path / "pickled"
    shutil.copytree(gpt2_dir, model)
    (model / "model.safetensors").unlink()
    # Never unpickled: the check looks at file names only, before any loading.
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    code, output = run("generate", "--model", str(model), PROMPT)
    assert code == 2
    line = one_error_line(output)
    assert f"{model / 'pytorch_model.bin'} is a pickle" in line
    assert "--allow-pickle-weights" in line
    code, output = run("validate", "--model", str(model), MEMORY)
    assert code == 2 and "is a pickle" in output


def test_debug_works_after_the_command_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as quiet:
        main(["generate", "--model", "toyworl", PROMPT])
    assert quiet.value.code == 2
    from meminject.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="did you mean 'toyworld'"):
        main(["generate", "--model", "toyworl", PROMPT, "--debug"])


def test_threads_option_sets_torch_threads() -> None:
    import torch

    before = torch.get_num_threads()
    try:
        code, output = run("generate", "--threads", "1", "--max-new-tokens", "1", PROMPT)
        assert code == 0, output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_resume_mismatch_lists_tau_in_numeric_order_and_advises_force() -> None:
    import pandas as pd

    from meminject.errors import BadInputError
    from meminject.sweep import SweepConfig
    from meminject.sweep.records import finished_records

    done = pd.DataFrame(
        {
            "layer": [0, 0],
            "tau": [10.0, 2.0],
            "encoding": ["unembed"] * 2,
            "metric": ["first-token"] * 2,
            "row_id": [0, 0],
        }
    )
    with pytest.raises(BadInputError) as info:
        finished_records(done, SweepConfig(layers=(0,), taus=(2.0, 4.0, 10.0)))
    assert "tau: [2.0, 10.0] instead of [2.0, 4.0, 10.0]" in str(info.value)
    assert "pass --force instead of --resume" in str(info.value)
