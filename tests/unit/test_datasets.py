"""Dataset loaders for sweeps: the paper's CSV columns, mappings, toyworld, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from meminject.datasets import PromptRow, resolve_dataset
from meminject.default_plugins.datasets import load_csv, load_toyworld
from meminject.errors import BadInputError
from meminject.hookspecs import hookimpl
from meminject.plugins import build_registry
from tests.conftest import SHARED_DATA, write

PAPER_CSV = (
    "explicit_sentence,obscure_sentence,explicit_entity,obscure_entity,answer\n"
    "Ada Lovelace wrote the,The daughter of Lord Byron wrote the,Ada Lovelace,"
    "The daughter of Lord Byron,first program\n"
    '"Oslo, the capital, lies in",The capital of Norway lies in,Oslo,The capital of Norway,'
    "Europe\n"
)


def test_reads_the_paper_columns(tmp_path):
    rows = load_csv(write(tmp_path / "d.csv", PAPER_CSV))
    assert rows == [
        PromptRow(
            prompt="The daughter of Lord Byron wrote the",
            memory="Ada Lovelace",
            answer="first program",
            explicit_prompt="Ada Lovelace wrote the",
            row_id=0,
        ),
        PromptRow(
            prompt="The capital of Norway lies in",
            memory="Oslo",
            answer="Europe",
            explicit_prompt="Oslo, the capital, lies in",  # a quoted comma stays in the field
            row_id=1,
        ),
    ]


def test_strings_are_kept_verbatim_no_leading_space_added(tmp_path):
    """The answer's leading space is the tokenizer's business (see sweep.answer_tokens):
    the loader never edits what the file says, and values such as NA stay strings."""
    path = write(
        tmp_path / "d.csv",
        "obscure_sentence,explicit_entity,answer\nThe country south of Angola is,Namibia,NA\n"
        "  Spaces around  , Ada ,None\n",
    )
    rows = load_csv(path)
    assert rows[0].answer == "NA" and rows[1].answer == "None"
    assert rows[1].prompt == "  Spaces around  " and rows[1].memory == " Ada "
    assert rows[0].explicit_prompt is None


def test_two_wiki_multi_hop_column_names(tmp_path):
    path = write(
        tmp_path / "w.csv",
        ",explicit_sent,obscure_sent,explicit_entity,obscure_entity,fact1,fact2,answer\n"
        "0,The birthplace of Jan Kowal is,The birthplace of the director of Rain is,"
        "Jan Kowal,the director of Rain,\"['Rain', 'director', 'Jan Kowal']\",x,Lodz\n",
    )
    (row,) = load_csv(path)
    assert row.prompt == "The birthplace of the director of Rain is"
    assert row.explicit_prompt == "The birthplace of Jan Kowal is"
    assert row.memory == "Jan Kowal" and row.answer == "Lodz"


def test_column_mapping(tmp_path):
    path = write(tmp_path / "m.csv", "question,bridge,target,direct\nQ one,B one,T one,D one\n")
    (row,) = load_csv(
        path,
        prompt_column="question",
        memory_column="bridge",
        answer_column="target",
        explicit_column="direct",
    )
    assert row == PromptRow("Q one", "B one", "T one", "D one", 0)


def test_byte_order_mark_and_limit(tmp_path):
    body = "obscure_sentence,explicit_entity,answer\n" + "".join(
        f"prompt {i},memory {i},answer {i}\n" for i in range(5)
    )
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    rows = load_csv(path, limit=2)
    assert [r.row_id for r in rows] == [0, 1]
    assert rows[1].prompt == "prompt 1"


def test_missing_file_is_one_line_error_naming_it(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(BadInputError) as info:
        load_csv(missing)
    assert str(missing) in str(info.value) and "\n" not in str(info.value)


def test_missing_column_names_file_and_column(tmp_path):
    path = write(tmp_path / "d.csv", "obscure_sentence,answer\nA prompt,an answer\n")
    with pytest.raises(BadInputError) as info:
        load_csv(path)
    message = str(info.value)
    assert str(path) in message and "'explicit_entity'" in message and "\n" not in message


def test_mapped_column_that_does_not_exist(tmp_path):
    path = write(tmp_path / "d.csv", PAPER_CSV)
    with pytest.raises(BadInputError, match=r"column 'question' \(the prompt\) is not in the file"):
        load_csv(path, prompt_column="question")


def test_empty_cell_names_line_and_column(tmp_path):
    path = write(tmp_path / "d.csv", "obscure_sentence,explicit_entity,answer\nP,M,A\nP2,,A2\n")
    with pytest.raises(BadInputError, match=r"d\.csv:3: column 'explicit_entity' is empty"):
        load_csv(path)


def test_ragged_row_and_empty_file(tmp_path):
    ragged = write(tmp_path / "r.csv", "obscure_sentence,explicit_entity,answer\nP,M\n")
    with pytest.raises(BadInputError, match="row has 2 fields, the header has 3"):
        load_csv(ragged)
    empty = write(tmp_path / "e.csv", "")
    with pytest.raises(BadInputError, match="empty"):
        load_csv(empty)


def test_built_in_datasets_are_registered_through_the_hook():
    registry = build_registry(load_entrypoints=False)
    assert {"csv", "toyworld"} <= set(registry.datasets)
    plugin = "meminject.default_plugins.datasets"
    assert registry.datasets["toyworld"].plugin == plugin
    assert any(p.name == plugin and p.builtin for p in registry.plugins)


def test_resolve_by_path_by_name_and_unknown(tmp_path):
    registry = build_registry(load_entrypoints=False)
    path = write(tmp_path / "d.csv", PAPER_CSV)
    assert len(resolve_dataset(str(path), registry)) == 2
    assert len(resolve_dataset(str(path), registry, limit=1, prompt_column=None)) == 1
    with pytest.raises(BadInputError, match="unknown dataset 'nonsense'"):
        resolve_dataset("nonsense", registry)
    with pytest.raises(BadInputError, match="needs a path"):
        resolve_dataset("csv", registry)


class _DatasetPlugin:
    """A third-party dataset, registered the way a plugin does it."""

    @staticmethod
    @hookimpl
    def register_datasets(register):
        def loader(path, **options):
            return [PromptRow("The sky is", "weather", "blue", None, 0)]

        register("sky", loader, "one row about the sky")


def test_plugin_dataset_resolves_by_name():
    # Installed plugins are left out: this test is about the hook, not the environment.
    registry = build_registry([("sky-plugin", _DatasetPlugin())], load_entrypoints=False)
    assert registry.datasets["sky"].plugin == "sky-plugin"
    rows = resolve_dataset("sky", registry)
    assert rows == [PromptRow("The sky is", "weather", "blue", None, 0)]


def test_toyworld_loader_reads_the_shipped_csv_or_says_how_to_make_it(tmp_path):
    from meminject import toyworld

    with pytest.raises(BadInputError, match="toyworld dataset is missing"):
        load_toyworld(tmp_path)  # a directory without dataset.csv
    if not toyworld.dataset_path().is_file():
        pytest.skip("toyworld's dataset.csv has not been generated in this checkout")
    rows = load_toyworld()
    assert rows and all(r.prompt and r.memory and r.answer and r.explicit_prompt for r in rows)
    assert [r.row_id for r in rows] == list(range(len(rows)))


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="the paper's data is not in this workplace")
@pytest.mark.parametrize(
    ("name", "n_rows"),
    [("handwritten_obscure_explicit_data.csv", 106), ("multi_hop_100.csv", 100)],
)
def test_the_papers_files_load(name, n_rows):
    rows = load_csv(Path(SHARED_DATA) / name)
    assert len(rows) == n_rows
    assert all(r.prompt and r.memory and r.answer and r.explicit_prompt for r in rows)
