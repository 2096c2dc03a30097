"""Plugin manager: loads built-in and installed plugins, and collects what they register.

Built-ins (:mod:`meminject.default_plugins`) go through exactly the same hooks as
third-party plugins (the ``llm`` way), so the built-in encoders and strategies are also
the reference examples.
Each hook implementation is called on its own with a ``register`` callback bound
to the plugin's name; that is how a clash, or an exception, names its plugin.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from importlib import metadata
from typing import Any, Literal, get_args, get_origin

import pluggy
from pydantic import BaseModel

from meminject import hookspecs
from meminject.errors import PluginConfigError, PluginError
from meminject.extension import Strategy
from meminject.schema import MemoryBase, StrictModel, build_file_model

ENV_VAR = "MEMINJECT_LOAD_PLUGINS"
ENTRY_POINT_GROUP = "meminject"
#: The built-in plugins (:mod:`meminject.default_plugins`), registered in this order.
BUILTIN_MODULES = (
    "meminject.default_plugins.encoders",
    "meminject.default_plugins.strategies",
    "meminject.default_plugins.models",
    "meminject.default_plugins.datasets",
    "meminject.default_plugins.backends",
)
_NAME = re.compile(r"^[a-z][a-z0-9_\-]*$")
_SUFFIX = re.compile(r"\.[\w.\-]+")


@dataclass(frozen=True)
class EncoderEntry:
    name: str
    encoder: Callable[..., Any]
    params_model: type[BaseModel] | None
    plugin: str


@dataclass(frozen=True)
class StrategyEntry:
    name: str
    strategy_cls: type[Strategy]
    plugin: str


@dataclass(frozen=True)
class ModelEntry:
    name: str
    loader: Callable[..., Any]
    description: str
    plugin: str
    #: Where the weights come from, or None when they are not installed (no heavy imports).
    where: Callable[[], str | None] | None = None
    #: The source's BOS convention; None leaves it to the model (TransformerLens's default).
    prepend_bos: bool | None = None
    #: Fetches the weights when the user asks (``meminject models pull NAME``).
    pull: Callable[..., Any] | None = None


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    loader: Callable[..., Any]
    description: str
    plugin: str
    #: The loader's own options (``-D KEY=VALUE``), a pydantic model; None: keyword options.
    options_model: type[BaseModel] | None = None
    #: File suffixes the loader reads (``.jsonl``): such files go to it, not to ``csv``.
    suffixes: tuple[str, ...] = ()


@dataclass(frozen=True)
class BackendEntry:
    name: str
    #: Builds the backend for a loaded model (see :class:`meminject.backends.Backend`).
    factory: Callable[..., Any]
    plugin: str
    #: Whether ``--backend auto`` may choose it (in registration order).
    auto: bool
    description: str = ""


@dataclass(frozen=True)
class PluginInfo:
    name: str
    hooks: tuple[str, ...]
    version: str | None
    builtin: bool
    #: What looks wrong with the plugin though it loaded (see :class:`PluginWarning`).
    warnings: tuple[str, ...] = ()


@dataclass
class Registry:
    """What the loaded plugins registered. Build one with :func:`build_registry`."""

    pm: pluggy.PluginManager
    plugins: list[PluginInfo] = field(default_factory=list)
    encoders: dict[str, EncoderEntry] = field(default_factory=dict)
    strategies: dict[str, StrategyEntry] = field(default_factory=dict)
    models: dict[str, ModelEntry] = field(default_factory=dict)
    datasets: dict[str, DatasetEntry] = field(default_factory=dict)
    backends: dict[str, BackendEntry] = field(default_factory=dict)
    #: Installed plugins left out by ``MEMINJECT_LOAD_PLUGINS`` (or ``--no-plugins``).
    not_loaded: tuple[str, ...] = ()
    #: Problems in plugins that did not stop loading (also issued as :class:`PluginWarning`).
    warnings: list[str] = field(default_factory=list)

    def plugins_off_note(self) -> str:
        """Why a name a file uses may be missing: installed plugins that were not loaded.
        Empty when every installed plugin is loaded."""
        if not self.not_loaded:
            return ""
        value = os.environ.get(ENV_VAR)
        if value is not None and not value.strip():
            how = f"--no-plugins or {ENV_VAR}=''"
        else:
            how = f"{ENV_VAR}={value!r}" if value is not None else "the plugin selection"
        return (
            f" (plugins are off: {how} leaves out the installed "
            f"plugin{'s' * (len(self.not_loaded) > 1)} {', '.join(self.not_loaded)})"
        )

    @cached_property
    def file_model(self) -> type[StrictModel]:
        """The pydantic model of a memory file, given what is registered."""
        return build_file_model(
            {name: e.strategy_cls.memory_model for name, e in self.strategies.items()},
            {name: e.params_model for name, e in self.encoders.items()},
        )

    def strategy(self, name: str) -> Strategy:
        return self.strategies[name].strategy_cls()

    def add_commands(self, cli: Any) -> None:
        for impl in self.pm.hook.register_commands.get_hookimpls():
            plugin = self.pm.get_name(impl.plugin) or "?"
            try:
                impl.function(**_kwargs(impl, cli=cli))
            except Exception as exc:
                raise PluginError(plugin, f"register_commands raised {exc!r}") from exc


def _kwargs(impl: Any, **available: Any) -> dict[str, Any]:
    """Pass an implementation only the arguments it asks for (hooks may grow)."""
    return {name: available[name] for name in impl.argnames if name in available}


class PluginWarning(UserWarning):
    """A plugin loaded, but looks like it does not do what its author meant."""


def _allowed_plugins() -> set[str] | None:
    value = os.environ.get(ENV_VAR)
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


def _entry_points() -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def build_registry(
    extra_plugins: Iterable[tuple[str, object]] = (), *, load_entrypoints: bool = True
) -> Registry:
    """Load built-ins, installed plugins (filtered by ``MEMINJECT_LOAD_PLUGINS``) and
    ``extra_plugins`` (name, module-or-object pairs, for tests), then collect registrations.

    An extra plugin replaces an installed one of the same name or the same module, so a
    plugin's own tests and notebooks work whether or not the package is installed.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    infos: list[PluginInfo] = []
    found_warnings: list[str] = []
    extras = list(extra_plugins)
    extra_names = {name for name, _ in extras}
    extra_ids = {id(plugin) for _, plugin in extras}

    def add(name: str, plugin: object, version: str | None, builtin: bool) -> None:
        try:
            pm.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            raise PluginError(name, f"invalid hook implementation: {exc}") from exc
        hooks = tuple(sorted(impl.name for impl in pm.get_hookcallers(plugin) or ()))
        undecorated = _undecorated_hooks(plugin) if not hooks else []
        notes = tuple(
            f"plugin '{name}' implements no hooks, but defines "
            f"{', '.join(f'{n}()' for n in undecorated)} without @meminject.hookimpl "
            "(decorate the function, or nothing is registered)"
            for _ in undecorated[:1]
        )
        found_warnings.extend(notes)
        infos.append(PluginInfo(name, hooks, version, builtin, notes))

    for module_name in BUILTIN_MODULES:
        add(module_name, importlib.import_module(module_name), None, True)

    not_loaded: list[str] = []
    if load_entrypoints:
        allowed = _allowed_plugins()
        found = _entry_points()
        if allowed is not None:
            known = {ep.name for ep in found} | {
                ep.dist.name for ep in found if ep.dist is not None
            }
            missing = sorted(allowed - known)
            if missing:
                close = difflib.get_close_matches(missing[0], sorted(known), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                installed = ", ".join(sorted(ep.name for ep in found)) or "none"
                raise PluginConfigError(
                    missing[0],
                    f"{ENV_VAR} names it, but no such plugin is installed{hint} "
                    f"(installed: {installed})",
                )
        for ep in found:
            dist = ep.dist.name if ep.dist is not None else None
            if allowed is not None and ep.name not in allowed and dist not in allowed:
                not_loaded.append(ep.name)
                continue
            if ep.name in extra_names:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(ep.name, f"failed to import: {exc!r}") from exc
            if id(plugin) in extra_ids:
                continue
            add(ep.name, plugin, ep.dist.version if ep.dist is not None else None, False)

    for name, plugin in extras:
        add(name, plugin, None, False)

    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        plugin_name = pm.get_name(exc.plugin) or "?"
        raise PluginError(plugin_name, _unknown_hook_message(pm, exc)) from exc

    registry = Registry(pm=pm, plugins=infos, not_loaded=tuple(not_loaded), warnings=found_warnings)
    _collect(registry)
    for message in found_warnings:
        warnings.warn(message, PluginWarning, stacklevel=2)
    return registry


def _hook_names() -> list[str]:
    return sorted(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "meminject_spec"))


def _undecorated_hooks(plugin: object) -> list[str]:
    """Functions of ``plugin`` named like a hook (or nearly) that are not hook
    implementations: the usual reason a plugin loads and registers nothing."""
    names = _hook_names()
    out = []
    for attr in sorted(dir(plugin)):
        if attr.startswith("_") or not callable(getattr(plugin, attr, None)):
            continue
        if (
            attr in names
            or attr.startswith("register_")
            or difflib.get_close_matches(attr, names, n=1, cutoff=0.85)
        ):
            out.append(attr)
    return out


def _unknown_hook_message(pm: pluggy.PluginManager, exc: pluggy.PluginValidationError) -> str:
    unknown = [
        caller.name for caller in pm.get_hookcallers(exc.plugin) or () if not caller.has_spec()
    ]
    if not unknown:
        return f"implements an unknown hook: {exc}"
    name = unknown[0]
    close = difflib.get_close_matches(name, _hook_names(), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"implements an unknown hook '{name}'{hint} (hooks: {', '.join(_hook_names())})"


def _collect(registry: Registry) -> None:
    pm = registry.pm

    def each(hook: Any, make_register: Callable[[str], Callable[..., None]]) -> None:
        for impl in hook.get_hookimpls():  # registration order
            plugin = pm.get_name(impl.plugin) or "?"
            try:
                impl.function(**_kwargs(impl, register=make_register(plugin)))
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(plugin, f"{hook.name} raised {exc!r}") from exc

    def checked_name(kind: str, name: Any, plugin: str, taken: dict[str, Any]) -> str:
        if not isinstance(name, str) or not _NAME.match(name):
            raise PluginError(plugin, f"{kind} name {name!r} is not a lowercase identifier")
        if name in taken:
            raise PluginError(
                plugin, f"{kind} '{name}' is already registered by plugin '{taken[name].plugin}'"
            )
        return name

    def encoder_register(plugin: str) -> Callable[..., None]:
        def register(
            name: str, encoder: Callable[..., Any], params_model: type[BaseModel] | None = None
        ) -> None:
            checked_name("encoder", name, plugin, registry.encoders)
            if not callable(encoder):
                raise PluginError(plugin, f"encoder '{name}' is not callable")
            if params_model is not None and not (
                isinstance(params_model, type) and issubclass(params_model, BaseModel)
            ):
                raise PluginError(plugin, f"encoder '{name}': params_model is not a pydantic model")
            registry.encoders[name] = EncoderEntry(name, encoder, params_model, plugin)

        return register

    def strategy_register(plugin: str) -> Callable[..., None]:
        def register(name: Any, strategy_cls: Any = None) -> None:
            if strategy_cls is None:  # register(StrategyClass): the name is the file's
                strategy_cls, name = name, _declared_strategy(name)
                if name is None:
                    raise PluginError(
                        plugin,
                        f"register({getattr(strategy_cls, '__name__', strategy_cls)!r}): its "
                        "memory_model needs a field `strategy: Literal['<name>']`",
                    )
            checked_name("strategy", name, plugin, registry.strategies)
            if not (isinstance(strategy_cls, type) and issubclass(strategy_cls, Strategy)):
                raise PluginError(plugin, f"strategy '{name}' is not a meminject Strategy class")
            model = getattr(strategy_cls, "memory_model", None)
            if not (isinstance(model, type) and issubclass(model, MemoryBase)):
                raise PluginError(plugin, f"strategy '{name}' has no memory_model (a MemoryBase)")
            declared = _declared_strategy(strategy_cls)
            if declared != name:
                got = f"Literal[{declared!r}]" if declared else "no single-value Literal"
                raise PluginError(
                    plugin,
                    f"strategy '{name}': its memory_model {model.__name__} declares strategy "
                    f"{got}, so no memory file could select '{name}'; give the memory model "
                    f"`strategy: Literal[{name!r}]`",
                )
            own_name = strategy_cls.__dict__.get("name")
            if own_name is None:
                strategy_cls.name = name  # one name: the file's, stated in the memory model
            elif own_name != name:
                raise PluginError(
                    plugin,
                    f"strategy '{name}': {strategy_cls.__name__}.name is {own_name!r}; drop "
                    "it (the name comes from the memory model) or make them agree",
                )
            registry.strategies[name] = StrategyEntry(name, strategy_cls, plugin)

        return register

    def model_register(plugin: str) -> Callable[..., None]:
        def register(
            name: str,
            loader: Callable[..., Any],
            description: str = "",
            *,
            where: Callable[[], str | None] | None = None,
            prepend_bos: bool | None = None,
            pull: Callable[..., Any] | None = None,
        ) -> None:
            checked_name("model", name, plugin, registry.models)
            if prepend_bos is not None and not isinstance(prepend_bos, bool):
                raise PluginError(plugin, f"model '{name}': prepend_bos must be a bool or None")
            registry.models[name] = ModelEntry(
                name, loader, description, plugin, where, prepend_bos, pull
            )

        return register

    def dataset_register(plugin: str) -> Callable[..., None]:
        def register(
            name: str,
            loader: Callable[..., Any],
            description: str = "",
            *,
            options_model: type[BaseModel] | None = None,
            suffixes: Iterable[str] = (),
        ) -> None:
            checked_name("dataset", name, plugin, registry.datasets)
            if not callable(loader):
                raise PluginError(plugin, f"dataset '{name}': loader is not callable")
            if options_model is not None and not (
                isinstance(options_model, type) and issubclass(options_model, BaseModel)
            ):
                raise PluginError(
                    plugin, f"dataset '{name}': options_model is not a pydantic model"
                )
            if isinstance(suffixes, str):
                suffixes = (suffixes,)
            claimed = tuple(suffixes)
            bad = [
                x for x in claimed if not (isinstance(x, str) and re.fullmatch(r"\.[\w.\-]+", x))
            ]
            if bad:
                raise PluginError(
                    plugin, f"dataset '{name}': suffix {bad[0]!r} is not like '.jsonl'"
                )
            registry.datasets[name] = DatasetEntry(
                name, loader, description, plugin, options_model, claimed
            )

        return register

    def backend_register(plugin: str) -> Callable[..., None]:
        def register(
            name: str, factory: Callable[..., Any], description: str = "", *, auto: bool = False
        ) -> None:
            checked_name("backend", name, plugin, registry.backends)
            if name == "auto":
                raise PluginError(plugin, "backend name 'auto' is reserved (it picks a backend)")
            if not callable(factory):
                raise PluginError(plugin, f"backend '{name}': factory is not callable")
            registry.backends[name] = BackendEntry(name, factory, plugin, bool(auto), description)

        return register

    each(pm.hook.register_encoders, encoder_register)
    each(pm.hook.register_strategies, strategy_register)
    each(pm.hook.register_models, model_register)
    each(pm.hook.register_datasets, dataset_register)
    each(pm.hook.register_backends, backend_register)


def _declared_strategy(strategy_cls: Any) -> str | None:
    """The one value of ``memory_model``'s ``strategy: Literal[...]`` field, or None."""
    model = getattr(strategy_cls, "memory_model", None)
    fields = getattr(model, "model_fields", {})
    if "strategy" not in fields:
        return None
    annotation = fields["strategy"].annotation
    if get_origin(annotation) is not Literal:
        return None
    values = get_args(annotation)
    return values[0] if len(values) == 1 and isinstance(values[0], str) else None


_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _registry
    if _registry is None:
        _registry = build_registry()
    return _registry


def reset_registry(registry: Registry | None = None) -> None:
    """Replace (or drop) the process-wide registry; tests use this."""
    global _registry
    _registry = registry
