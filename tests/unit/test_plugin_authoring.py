"""Plugin authoring, second pass (issue 17): what a third-party author hits, without a model.

Datasets that take a path and options, encoder parameters in sweep labels and Python
memories, the sites table and its helpers, one strategy name checked at registration,
warnings and errors for author mistakes, and ``[memory.params]`` errors at their key.
"""

from __future__ import annotations

import typing
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from meminject import hookimpl
from meminject.datasets import PromptRow, dataset_target, parse_option, resolve_dataset
from meminject.errors import (
    EXIT_BAD_INPUT,
    BadInputError,
    MemoryFileError,
    PluginConfigError,
    PluginError,
)
from meminject.extension import Strategy
from meminject.memfile import load_memory_set, memories_from_tables
from meminject.plugins import ENV_VAR, PluginWarning, build_registry
from meminject.schema import AddMemory, MemoryBase
from meminject.specs import parse_encoding_list
from meminject.sweep import encoding_label, encoding_parts
from meminject.testing import invoke_cli, registered_plugins
from tests.conftest import write
from tests.unit.test_plugins import make_distribution, site_dir  # noqa: F401 (fixture)

# --------------------------------------------------------------------------- datasets


class RowOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    answer_key: str = Field("answer", description="Key of the answer.")
    repeat: int = Field(1, ge=1, description="Rows per line.")


class _RowsPlugin:
    """A JSONL-ish loader with options and a claimed suffix, plus a built-in set."""

    seen: typing.ClassVar[list[tuple[Any, Any]]] = []

    @staticmethod
    @hookimpl
    def register_datasets(register):
        def rows_loader(path, options):
            _RowsPlugin.seen.append((path, options))
            return [
                PromptRow("p", "m", options.answer_key, row_id=i) for i in range(options.repeat)
            ]

        def builtin_loader(path):
            _RowsPlugin.seen.append((path, {}))
            return [PromptRow("q", "m", "a", row_id=0)]

        register("rows", rows_loader, "rows", options_model=RowOptions, suffixes=(".rows",))
        register("quiz", builtin_loader, "a built-in quiz")


@pytest.fixture
def rows_registry():
    _RowsPlugin.seen = []
    return build_registry([("rows-plugin", _RowsPlugin())], load_entrypoints=False)


def test_a_registered_name_gets_none_and_name_colon_path_gets_the_path(rows_registry):
    resolve_dataset("quiz", rows_registry)
    resolve_dataset("rows:data/file.txt", rows_registry)
    assert _RowsPlugin.seen[0] == (None, {})
    assert _RowsPlugin.seen[1][0] == "data/file.txt"
    assert isinstance(_RowsPlugin.seen[1][1], RowOptions)


def test_a_claimed_suffix_routes_the_file_to_its_loader(rows_registry):
    assert dataset_target("train.rows", rows_registry) == ("rows", "train.rows")
    assert dataset_target("TRAIN.ROWS", rows_registry) == ("rows", "TRAIN.ROWS")
    assert dataset_target("train.csv", rows_registry) == ("csv", "train.csv")
    assert dataset_target("csv:odd.name", rows_registry) == ("csv", "odd.name")


def test_options_are_validated_by_the_loaders_model(rows_registry):
    rows = resolve_dataset("x.rows", rows_registry, options={"answer_key": "k", "repeat": 3})
    assert [r.answer for r in rows] == ["k", "k", "k"]
    with pytest.raises(BadInputError) as info:
        resolve_dataset("x.rows", rows_registry, options={"answer_kye": "k"})
    assert str(info.value) == (
        "dataset 'rows': option 'answer_kye': unknown option 'answer_kye'; "
        "did you mean 'answer_key'?"
    )
    with pytest.raises(
        BadInputError, match=r"option 'repeat': .*greater than or equal to 1, got 0"
    ):
        resolve_dataset("x.rows", rows_registry, options={"repeat": 0})
    with pytest.raises(BadInputError, match=r"dataset 'quiz' takes no option 'answer_key'"):
        resolve_dataset("quiz", rows_registry, options={"answer_key": "k"})


def test_option_values_are_read_as_toml_else_as_strings():
    assert parse_option("repeat=3") == ("repeat", 3)
    assert parse_option("flag=true") == ("flag", True)
    assert parse_option('name="a b"') == ("name", "a b")
    assert parse_option("name=plain words") == ("name", "plain words")
    assert parse_option("keys=[1, 2]") == ("keys", [1, 2])
    with pytest.raises(BadInputError, match="write KEY=VALUE"):
        parse_option("novalue")


def test_unknown_dataset_suggests_a_name_and_non_csv_files_get_a_hint(rows_registry, tmp_path):
    with pytest.raises(BadInputError, match=r"unknown dataset 'quz'.*did you mean 'quiz'\?"):
        resolve_dataset("quz", rows_registry)
    odd = write(tmp_path / "rows.jsonl", '{"prompt": "p"}\n')
    with pytest.raises(BadInputError, match=r"read as a CSV .*NAME:PATH"):
        resolve_dataset(str(odd), rows_registry)


def test_two_loaders_claiming_a_suffix_must_be_named(rows_registry):
    class Other:
        @staticmethod
        @hookimpl
        def register_datasets(register):
            register("other", lambda path, **o: [], suffixes=".rows")

    registry = build_registry([("a", _RowsPlugin()), ("b", Other())], load_entrypoints=False)
    with pytest.raises(BadInputError, match=r"loaders other, rows all read such files"):
        dataset_target("x.rows", registry)
    assert dataset_target("other:x.rows", registry) == ("other", "x.rows")


def _broken_datasets(bad_suffix: bool) -> Any:
    class Broken:
        @staticmethod
        @hookimpl
        def register_datasets(register):
            def boom(path, **options):
                raise KeyError("column")

            register("boom", boom)
            register(
                "dupes", lambda path, **o: [PromptRow("p", "m", "a"), PromptRow("q", "m", "a")]
            )
            if bad_suffix:
                register("bad-suffix", boom, suffixes=("jsonl",))

    return Broken()


def test_a_broken_loader_is_the_plugins_failure():
    with pytest.raises(PluginError, match=r"dataset 'bad-suffix': suffix 'jsonl' is not like"):
        build_registry([("broken", _broken_datasets(True))], load_entrypoints=False)
    registry = build_registry([("fine", _broken_datasets(False))], load_entrypoints=False)
    with pytest.raises(PluginError, match=r"plugin 'fine': dataset 'boom' failed: KeyError"):
        resolve_dataset("boom", registry)
    with pytest.raises(PluginError, match=r"plugin 'fine': dataset 'dupes': row ids repeat"):
        resolve_dataset("dupes", registry)


def test_datasets_command_lists_loaders_suffixes_and_options(rows_registry):
    result = invoke_cli(["datasets"], rows_registry)
    assert result.exit_code == 0, result.output
    assert "rows  [rows-plugin]  rows" in result.output
    assert "reads files ending .rows (or rows:PATH)" in result.output
    assert "-D answer_key: str = 'answer' — Key of the answer." in result.output
    assert "csv  [meminject.default_plugins.datasets]" in result.output


# --------------------------------------------------------------------------- encoder params


class ScaleParams(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    scale: float = Field(1.0, description="Factor on the unembedding.")
    source: Literal["unembed", "embed"] = "unembed"


class _ScaledPlugin:
    @staticmethod
    @hookimpl
    def register_encoders(register):
        def scaled(request):
            bridge = request.model.bridge
            tokens = request.distinct_tokens()
            base = (
                bridge.W_U[:, tokens].sum(-1)
                if request.params.source == "unembed"
                else bridge.W_E[tokens].sum(0)
            )
            return (request.params.scale * base).detach().clone()

        register("scaled", scaled, params_model=ScaleParams)


@pytest.fixture
def scaled_registry():
    return build_registry([("scaled", _ScaledPlugin())], load_entrypoints=False)


def test_encoding_labels_carry_parameters(scaled_registry):
    name, params = encoding_parts('scaled{scale = 2.0, source = "embed"}', scaled_registry)
    assert name == "scaled" and params == ScaleParams(scale=2.0, source="embed")
    assert encoding_parts("scaled", scaled_registry)[1] == ScaleParams()  # defaults
    assert encoding_parts("unembed", scaled_registry) == ("unembed", None)
    label = encoding_label('scaled{ source="embed",scale=2.0 }', scaled_registry)
    assert label == 'scaled{scale = 2.0, source = "embed"}'
    assert encoding_label("scaled{}", scaled_registry) == "scaled"


def test_bad_encoding_parameters_are_named(scaled_registry):
    with pytest.raises(BadInputError) as info:
        encoding_parts("scaled{scael = 2.0}", scaled_registry)
    assert "parameter 'scael': unknown key 'scael' for encoder 'scaled'; did you mean 'scale'?" in (
        str(info.value)
    )
    with pytest.raises(BadInputError, match=r"parameter 'source': .*got 'both'"):
        encoding_parts('scaled{source = "both"}', scaled_registry)
    with pytest.raises(BadInputError, match=r"encoder 'unembed' takes no parameters"):
        encoding_parts("unembed{scale = 2.0}", scaled_registry)
    with pytest.raises(BadInputError, match=r"must be a TOML inline table"):
        encoding_parts("scaled{scale: 2}", scaled_registry)
    with pytest.raises(BadInputError, match=r"unknown encoding 'scald'"):
        encoding_parts("scald", scaled_registry)


def test_encoding_lists_split_outside_tables():
    assert parse_encoding_list('unembed, scaled{scale = 2.0, source = "a,b"},embed') == [
        "unembed",
        'scaled{scale = 2.0, source = "a,b"}',
        "embed",
    ]
    with pytest.raises(BadInputError):
        parse_encoding_list(" , ")


def test_memories_from_python_tables_are_validated_like_a_file(scaled_registry):
    table = {"name": "m", "text": "Paris", "encoding": "scaled", "layer": 1, "tau": 2.0}
    memory_set = memories_from_tables({**table, "params": {"scale": 3.0}}, registry=scaled_registry)
    assert memory_set.memories[0].encoder_params() == ScaleParams(scale=3.0)
    with pytest.raises(MemoryFileError) as info:
        memories_from_tables([{**table, "params": {"scael": 3.0}}], registry=scaled_registry)
    assert str(info.value) == (
        "<python>: memory 'm': field 'params.scael': unknown key 'scael' for encoder "
        "'scaled'; did you mean 'scale'?"
    )
    with pytest.raises(MemoryFileError, match="each memory must be a table"):
        memories_from_tables(["not a table"], registry=scaled_registry)  # type: ignore[list-item]


# --------------------------------------------------------------------------- strategy names


class FooMemory(MemoryBase):
    strategy: Literal["foo"]


class _Noop(Strategy):
    def compile(self, memories, ctx):
        return []


def _strategy_plugin(*args: Any) -> Any:
    class Plugin:
        @staticmethod
        @hookimpl
        def register_strategies(register):
            register(*args)

    return Plugin()


def test_register_takes_the_name_from_the_memory_model():
    class Foo(_Noop):
        memory_model = FooMemory

    registry = build_registry([("p", _strategy_plugin(Foo))], load_entrypoints=False)
    assert "foo" in registry.strategies and Foo.name == "foo"


def test_a_name_that_no_file_could_select_is_refused_at_registration():
    class Mislabelled(_Noop):
        memory_model = AddMemory

    with pytest.raises(PluginError) as info:
        build_registry([("p", _strategy_plugin("foo", Mislabelled))], load_entrypoints=False)
    assert str(info.value) == (
        "plugin 'p': strategy 'foo': its memory_model AddMemory declares strategy "
        "Literal['add'], so no memory file could select 'foo'; give the memory model "
        "`strategy: Literal['foo']`"
    )


def test_a_class_name_that_disagrees_is_refused():
    class Named(_Noop):
        name = "bar"
        memory_model = FooMemory

    with pytest.raises(PluginError, match=r"Named.name is 'bar'; drop it"):
        build_registry([("p", _strategy_plugin(Named))], load_entrypoints=False)

    class NoLiteral(_Noop):
        memory_model = MemoryBase

    with pytest.raises(PluginError, match=r"needs a field `strategy: Literal\['<name>'\]`"):
        build_registry([("p", _strategy_plugin(NoLiteral))], load_entrypoints=False)


def test_add_memory_subclasses_have_params():
    class TextMemory(AddMemory):
        strategy: Literal["text-thing"]  # type: ignore[assignment]

    assert "params" in TextMemory.model_fields


# --------------------------------------------------------------------------- author mistakes


def _main_exit_code(args: list[str]) -> Any:
    """The console entry point's exit code, with the process-wide registry rebuilt."""
    from meminject.cli import main
    from meminject.plugins import reset_registry

    reset_registry()
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
    finally:
        reset_registry()
    return exit_info.value.code


UNDECORATED = """
def register_encoders(register):
    register("lost", lambda request: None)
"""


def test_hook_functions_without_hookimpl_are_warned_about(site_dir, monkeypatch, capsys):  # noqa: F811
    make_distribution(site_dir, "meminject-lost", "mi_test_lost", UNDECORATED, "lost")
    monkeypatch.setenv(ENV_VAR, "lost")
    with pytest.warns(PluginWarning, match=r"plugin 'lost' implements no hooks, but defines "):
        registry = build_registry()
    assert registry.plugins[-1].warnings and "register_encoders()" in registry.warnings[0]
    assert _main_exit_code(["plugins"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("Warning: plugin 'lost' implements no hooks") == 1
    assert "lost (version 0.3): no hooks\n    warning: plugin 'lost'" in captured.out


def test_a_misspelled_hook_gets_a_suggestion():
    class Typo:
        @staticmethod
        @hookimpl
        def register_encoder(register):
            pass

    with pytest.raises(PluginError) as info:
        build_registry([("typo", Typo())], load_entrypoints=False)
    assert "implements an unknown hook 'register_encoder'; did you mean 'register_encoders'?" in (
        str(info.value)
    )


def test_an_unknown_plugin_selection_is_bad_input(site_dir, monkeypatch, capsys):  # noqa: F811
    make_distribution(site_dir, "meminject-double", "mi_test_double", UNDECORATED, "double")
    monkeypatch.setenv(ENV_VAR, "doubel")
    with pytest.raises(PluginConfigError, match=r"did you mean 'double'\?"):
        build_registry()
    assert _main_exit_code(["plugins"]) == EXIT_BAD_INPUT
    assert "no such plugin is installed; did you mean 'double'?" in capsys.readouterr().err


def test_with_plugins_off_a_missing_strategy_says_so(site_dir, monkeypatch, tmp_path):  # noqa: F811
    # Two plugins of this test's own, so the note names several whatever else is installed;
    # the expected names come from the entry points importlib sees here (the example
    # plugins where CI installs them, none in a bare venv), not from a fixed list.
    make_distribution(site_dir, "meminject-double", "mi_test_double", UNDECORATED, "double")
    make_distribution(site_dir, "meminject-half", "mi_test_half", UNDECORATED, "half")
    installed = sorted(ep.name for ep in metadata.entry_points(group="meminject"))
    assert {"double", "half"} <= set(installed)
    monkeypatch.setenv(ENV_VAR, "")
    registry = build_registry()
    assert list(registry.not_loaded) == installed  # every installed plugin is left out
    path = write(
        tmp_path / "m.toml",
        'version = 1\n[[memory]]\nname = "m"\nstrategy = "relative"\nlayer = 0\n',
    )
    with pytest.raises(MemoryFileError) as info:
        load_memory_set([path], registry)
    message = str(info.value)
    assert message.endswith(
        "memory 'm': unknown strategy 'relative'; registered: add, gated (plugins are off: "
        "--no-plugins or MEMINJECT_LOAD_PLUGINS='' leaves out the installed plugins "
        f"{', '.join(installed)})"
    ), message


def test_registered_plugins_replaces_the_installed_copy(site_dir, monkeypatch):  # noqa: F811
    import importlib

    source = "from meminject import hookimpl\n\n@hookimpl\ndef register_encoders(register):\n"
    source += "    register('twice', lambda request: request.model.bridge.W_U[:, 0])\n"
    make_distribution(site_dir, "meminject-twice", "mi_test_twice", source, "twice")
    monkeypatch.delenv(ENV_VAR, raising=False)
    module = importlib.import_module("mi_test_twice")
    with registered_plugins(("twice", module)) as registry:  # the tutorial's step 3
        assert [p.name for p in registry.plugins].count("twice") == 1
        assert registry.encoders["twice"].plugin == "twice"
    with registered_plugins(("renamed", module)) as registry:  # same module, another name
        assert "twice" not in [p.name for p in registry.plugins]
        assert registry.encoders["twice"].plugin == "renamed"


# --------------------------------------------------------------------------- params errors

PARAMS_FILE = """version = 1

[[memory]]
name = "m"
text = "Paris"
encoding = "scaled"
layer = 0
tau = 1.0

[memory.params]
source = "embed"
{line}
"""


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "scael = 2.0",
            "field 'params.scael': unknown key 'scael' for encoder 'scaled'; did you mean 'scale'?",
        ),
        ('scale = "2"', "field 'params.scale': Input should be a valid number, got '2'"),
        (
            "zzz = 1",
            "field 'params.zzz': unknown key 'zzz' for encoder 'scaled'; it takes scale, source",
        ),
    ],
)
def test_params_errors_point_at_the_key_and_show_the_value(
    scaled_registry, tmp_path, line, expected
):
    path = write(tmp_path / "m.toml", PARAMS_FILE.format(line=line))
    with pytest.raises(MemoryFileError) as info:
        load_memory_set([path], scaled_registry)
    assert str(info.value) == f"{path}:12: memory 'm': {expected}"


def test_inline_params_errors_point_at_the_params_line(scaled_registry, tmp_path):
    source = PARAMS_FILE.replace('[memory.params]\nsource = "embed"\n{line}\n', "")
    source = source.replace("tau = 1.0\n", "tau = 1.0\nparams = { scael = 2.0 }\n")
    path = write(tmp_path / "m.toml", source)
    with pytest.raises(MemoryFileError) as info:
        load_memory_set([path], scaled_registry)
    assert str(info.value).startswith(f"{path}:9: memory 'm': field 'params.scael'")


def test_no_warning_for_a_plugin_that_registers(recwarn):
    build_registry([("scaled", _ScaledPlugin())], load_entrypoints=False)
    assert not [w for w in recwarn if issubclass(w.category, PluginWarning)]


def test_tutorial_and_example_packages_use_the_spdx_license() -> None:
    import tomllib

    root = Path(__file__).resolve().parents[2]
    for pyproject in sorted((root / "plugins").glob("*/pyproject.toml")):
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
        assert data["project"]["license"] == "MIT", pyproject
        assert data["build-system"]["requires"] == ["setuptools>=77"], pyproject
    tutorial = (root / "docs" / "plugins" / "tutorial.md").read_text(encoding="utf-8")
    assert 'license = "MIT"' in tutorial and "setuptools>=77" in tutorial
