"""Plugin loading (docs/plugins/hooks.md): discovery, filtering, bad plugins, one test per hook."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Literal

import click
import pytest
from click.testing import CliRunner
from pydantic import BaseModel, ConfigDict

from meminject import hookimpl
from meminject.errors import PluginError
from meminject.extension import Strategy
from meminject.memfile import load_memory_set
from meminject.plugins import BUILTIN_MODULES, ENV_VAR, build_registry
from meminject.schema import MemoryBase, json_schema
from tests.conftest import write

BUILTINS = list(BUILTIN_MODULES)


def make_distribution(root: Path, dist: str, module: str, source: str, ep_name: str) -> None:
    """An installed distribution as importlib.metadata sees it: a module and a dist-info
    with a ``meminject`` entry point, on a sys.path entry."""
    write(root / f"{module}.py", textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-0.3.dist-info"
    write(info / "METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3\n")
    write(info / "entry_points.txt", f"[meminject]\n{ep_name} = {module}\n")


GOOD_PLUGIN = """
from meminject import hookimpl

def double_unembed(request):
    return 2 * request.model.bridge.W_U[:, request.distinct_tokens()].sum(-1)

@hookimpl
def register_encoders(register):
    register("double", double_unembed)
"""


@pytest.fixture
def site_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delenv(ENV_VAR, raising=False)
    yield root
    for name in [m for m in sys.modules if m.startswith("mi_test_")]:
        del sys.modules[name]


def test_builtins_register_through_the_same_hooks() -> None:
    registry = build_registry(load_entrypoints=False)
    assert [p.name for p in registry.plugins] == BUILTINS
    assert all(p.builtin for p in registry.plugins)
    assert list(registry.encoders) == ["unembed", "embed", "layer"]
    assert list(registry.strategies) == ["add", "gated"]
    assert "toyworld" in registry.models
    assert {e.plugin for e in registry.encoders.values()} == {"meminject.default_plugins.encoders"}


def test_entry_point_plugins_are_discovered(site_dir: Path) -> None:
    make_distribution(site_dir, "meminject-double", "mi_test_double", GOOD_PLUGIN, "double")
    registry = build_registry()
    info = {p.name: p for p in registry.plugins}["double"]
    assert info.version == "0.3" and not info.builtin and info.hooks == ("register_encoders",)
    assert registry.encoders["double"].plugin == "double"


@pytest.mark.parametrize(
    ("value", "loaded"),
    [(None, True), ("", False), ("double", True), ("meminject-double", True), ("other", None)],
)
def test_load_plugins_env_var_filters(site_dir, monkeypatch, value, loaded) -> None:
    make_distribution(site_dir, "meminject-double", "mi_test_double", GOOD_PLUGIN, "double")
    make_distribution(
        site_dir, "meminject-other", "mi_test_other", "from meminject import hookimpl\n", "other"
    )
    if value is not None:
        monkeypatch.setenv(ENV_VAR, value)
    registry = build_registry()
    names = [p.name for p in registry.plugins]
    assert names[: len(BUILTINS)] == BUILTINS
    if loaded is None:
        assert names == [*BUILTINS, "other"]
    else:
        assert ("double" in names) is loaded


def test_env_var_naming_a_missing_plugin_is_an_error(site_dir, monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, "nope")
    with pytest.raises(PluginError, match="plugin 'nope': MEMINJECT_LOAD_PLUGINS names it"):
        build_registry()


def test_plugin_failing_to_import_is_named(site_dir) -> None:
    make_distribution(
        site_dir,
        "meminject-broken",
        "mi_test_broken",
        "raise ImportError('needs numpy 9')\n",
        "broken",
    )
    with pytest.raises(PluginError, match=r"plugin 'broken': failed to import: .*numpy 9"):
        build_registry()


def test_unknown_hook_is_rejected(site_dir) -> None:
    make_distribution(
        site_dir,
        "meminject-typo",
        "mi_test_typo",
        """
        from meminject import hookimpl

        @hookimpl
        def register_encoder(register):
            pass
        """,
        "typo",
    )
    with pytest.raises(PluginError, match=r"plugin 'typo': implements an unknown hook"):
        build_registry()


def test_hook_with_unknown_argument_is_rejected() -> None:
    class Bad:
        @hookimpl
        def register_encoders(self, register, model):
            pass

    with pytest.raises(PluginError, match=r"plugin 'bad': invalid hook implementation"):
        build_registry([("bad", Bad())], load_entrypoints=False)


def test_clashing_name_names_both_plugins() -> None:
    class Clash:
        @hookimpl
        def register_encoders(self, register):
            register("embed", lambda request: None)

    with pytest.raises(PluginError) as info:
        build_registry([("clash", Clash())], load_entrypoints=False)
    assert str(info.value) == (
        "plugin 'clash': encoder 'embed' is already registered by plugin "
        "'meminject.default_plugins.encoders'"
    )


def test_registration_that_raises_is_named() -> None:
    class Raises:
        @hookimpl
        def register_models(self, register):
            raise RuntimeError("no GPU here")

    with pytest.raises(PluginError, match=r"plugin 'raises': register_models raised .*no GPU"):
        build_registry([("raises", Raises())], load_entrypoints=False)


def test_implementations_may_take_fewer_arguments() -> None:
    calls = []

    class Lazy:
        @hookimpl
        def register_strategies(self):
            calls.append("called")

    build_registry([("lazy", Lazy())], load_entrypoints=False)
    assert calls == ["called"]


# --- one test per hook ---------------------------------------------------------------


class ScaleParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: float = 1.0


class ScaledEmbed:
    @hookimpl
    def register_encoders(self, register):
        def scaled(request):
            return request.params.scale * request.model.bridge.W_E[request.distinct_tokens()].sum(0)

        register("scaled", scaled, params_model=ScaleParams)


def test_register_encoders_params_model_is_validated_and_exported(tmp_path) -> None:
    registry = build_registry([("scaled", ScaledEmbed())], load_entrypoints=False)
    schema = json_schema(registry.file_model)
    assert "ScaleParams" in str(schema["$defs"]["AddMemory"]["properties"]["params"])
    assert "scaled" in str(schema["$defs"]["AddMemory"]["properties"]["encoding"])
    good = write(
        tmp_path / "g.toml",
        'version = 1\n[[memory]]\nname = "m"\ntext = "Paris"\n'
        'layer = 0\ntau = 1.0\nencoding = "scaled"\n[memory.params]\nscale = 3.0\n',
    )
    memory = load_memory_set([good], registry).entries[0].memory
    assert memory.encoder_params() == ScaleParams(scale=3.0)
    bad = write(tmp_path / "b.toml", good.read_text().replace("scale = 3.0", "scael = 3.0"))
    with pytest.raises(
        Exception,
        match=r"field 'params.scael': unknown key 'scael' for encoder "
        "'scaled'",
    ):
        load_memory_set([bad], registry)


class Negate(Strategy):
    """Flip the sign of the residual stream at one layer (a toy strategy)."""

    name = "negate"

    class memory_model(MemoryBase):
        strategy: Literal["negate"]

    def compile(self, memories, ctx):
        from meminject.extension import SiteHook

        return [SiteHook(f"blocks.{m.layer}.hook_resid_pre", lambda a, c: -a) for m in memories]


class NegatePlugin:
    @hookimpl
    def register_strategies(self, register):
        register("negate", Negate)


def test_register_strategies_extends_the_file_union(tmp_path) -> None:
    registry = build_registry([("negate", NegatePlugin())], load_entrypoints=False)
    path = write(
        tmp_path / "n.toml", 'version = 1\n[[memory]]\nname = "n"\nstrategy = "negate"\nlayer = 1\n'
    )
    memory = load_memory_set([path], registry).entries[0].memory
    assert type(memory).__name__ == "memory_model" and memory.strategy == "negate"
    assert "negate" in str(json_schema(registry.file_model))


def test_register_strategy_rejects_non_strategy_class() -> None:
    class Bad:
        @hookimpl
        def register_strategies(self, register):
            register("bad", dict)

    with pytest.raises(PluginError, match="plugin 'bad': strategy 'bad' is not a meminject"):
        build_registry([("bad", Bad())], load_entrypoints=False)


def test_register_models_adds_a_named_source() -> None:
    class Source:
        @hookimpl
        def register_models(self, register):
            register("my-model", lambda device=None, dtype=None: "/nowhere", "Mine.")

    registry = build_registry([("source", Source())], load_entrypoints=False)
    entry = registry.models["my-model"]
    assert entry.description == "Mine." and entry.plugin == "source"
    assert entry.loader() == "/nowhere"


def test_register_commands_adds_cli_commands() -> None:
    class Commands:
        @hookimpl
        def register_commands(self, cli):
            @cli.command(name="hello")
            @click.argument("who")
            def hello(who):
                click.echo(f"hello {who}")

    registry = build_registry([("commands", Commands())], load_entrypoints=False)
    group = click.Group(commands={})
    registry.add_commands(group)
    result = CliRunner().invoke(group, ["hello", "world"])
    assert result.output == "hello world\n"


def test_plugins_command_lists_loaded_plugins(site_dir) -> None:
    from meminject.cli import cli
    from meminject.plugins import reset_registry

    make_distribution(site_dir, "meminject-double", "mi_test_double", GOOD_PLUGIN, "double")
    reset_registry()
    try:
        result = CliRunner().invoke(cli, ["plugins"])
        encoders = CliRunner().invoke(cli, ["encoders"])
    finally:
        reset_registry()
    assert result.exit_code == 0
    assert "meminject.default_plugins.encoders (built-in): register_encoders" in result.output
    assert "double (version 0.3): register_encoders" in result.output
    assert "double  [double]" in encoders.output


def test_no_plugins_flag_loads_built_ins_only(site_dir, capsys) -> None:
    from meminject.cli import main
    from meminject.plugins import reset_registry

    make_distribution(site_dir, "meminject-double", "mi_test_double", GOOD_PLUGIN, "double")
    reset_registry()
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["--no-plugins", "plugins"])
    finally:
        reset_registry()
    assert exit_info.value.code == 0
    output = capsys.readouterr().out
    assert "meminject.default_plugins.encoders (built-in)" in output
    assert "double (" not in output  # not listed as loaded …
    not_loaded = output.splitlines()[-1]
    assert not_loaded.startswith("not loaded") and "double" in not_loaded  # … but as left out
