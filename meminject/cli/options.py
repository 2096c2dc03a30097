"""Click options shared by the command modules (light: click only)."""

from __future__ import annotations

from typing import Any

import click

from meminject.dtypes import DTYPES
from meminject.model_handle import COORDINATES


class AliasOption(click.Option):
    """An option with old spellings kept for one release: they parse as the option does,
    but help (and the generated CLI reference) shows the current names only."""

    def __init__(self, *args: Any, old_names: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.old_names = tuple(old_names)
        self.opts = [*self.opts, *(o for o in self.old_names if o not in self.opts)]

    def get_error_hint(self, ctx: click.Context | None) -> str:
        return " / ".join(f"'{o}'" for o in self.opts if o not in self.old_names)

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        opts, self.opts = self.opts, [o for o in self.opts if o not in self.old_names]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = opts


def current_names(param: click.Parameter) -> list[str]:
    """A parameter's option names without its old spellings (see :class:`AliasOption`)."""
    old = getattr(param, "old_names", ())
    return [o for o in param.opts if o not in old]


def _to_meta(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    # Options every model-loading command shares but whose bodies never read: kept in
    # the context for load_cli_model, so commands need no parameter for them.
    ctx.meta[f"meminject_{param.name}"] = value


#: What ``--model`` defaults to, by the kind of command (see :func:`model_option`).
_MODEL_DEFAULTS = {
    "files": (
        None,
        "Model name, alias (gpt2-small) or local Hugging Face directory or GGUF "
        "file (default: the memory files' [model], else toyworld).",
    ),
    "toyworld": (
        "toyworld",
        "Model name, alias (gpt2-small) or local Hugging Face directory or GGUF file.",
    ),
    "optional": (
        None,
        "Also check ranges and widths against this model (loads it): a name, "
        "alias or local Hugging Face directory or GGUF file.",
    ),
}


def model_option(default: str = "files") -> Any:
    """``--model`` with every other model option: the one way a command takes a model.
    ``default``: "files" for commands that read memory files (their ``[model]`` names
    it, else toyworld), "toyworld" for those that read none, "optional" for ``validate``
    (no model unless asked)."""
    value, help_text = _MODEL_DEFAULTS[default]

    def decorate(f: Any) -> Any:
        f = model_options(f, memory_files=default != "toyworld")
        return click.option(
            "--model",
            "model_name",
            default=value,
            show_default=value is not None,
            help=help_text,
        )(f)

    return decorate


def number_option(flag: str, default: Any, kind: Any, help: str) -> Any:
    """A numeric option with its default shown."""
    return click.option(flag, default=default, show_default=True, type=kind, help=help)


def file_in_option(*decls: str, help: str) -> Any:
    """An optional file the command reads (checked by meminject's readers, not click)."""
    return click.option(*decls, type=click.Path(), default=None, help=help)


def file_out_option(*decls: str, help: str) -> Any:
    """An optional output file (a path, not a directory) the command writes."""
    from pathlib import Path

    return click.option(
        *decls, type=click.Path(dir_okay=False, path_type=Path), default=None, help=help
    )


def output_option(
    help: str,
    *,
    required: bool = False,
    old_names: tuple[str, ...] = (),
    checked_by_command: bool = False,
) -> Any:
    """``-o/--output``: the file a command writes (``llm``'s and curl's spelling). Old
    spellings (``--out``) still parse for one release, hidden from help.
    ``checked_by_command``: the command checks the path itself (``learn``, with one-line
    errors for a directory and more), so click only converts it."""
    from pathlib import Path

    return click.option(
        "-o",
        "--output",
        "output",
        cls=AliasOption,
        old_names=old_names,
        required=required,
        type=click.Path(path_type=Path, dir_okay=checked_by_command),
        default=None,
        help=help,
    )


def json_option(what: str = "Print JSON instead of text.") -> Any:
    """``--json``: machine-readable output, on every command that prints results."""
    return click.option("--json", "as_json", is_flag=True, help=what)


def heads_option(help: str) -> Any:
    """``--heads [SPEC]``: heads as a list spec (0-3, 0,5, all); the bare flag means all."""
    return click.option(
        "--heads",
        "head_spec",
        is_flag=False,
        flag_value="all",
        default=None,
        metavar="[SPEC]",
        help=help,
    )


#: The one rule for text that continues a prompt (learn --target, evaluate --target,
#: inspect --token); meminject.model_handle.continuation applies it.
CONTINUATION_RULE = (
    "Written as it follows the prompt; a space is put before it unless it starts with "
    "whitespace ('Paris' means ' Paris')."
)


def memories_option(help: str) -> Any:
    """``-m/--memories``: memory files or directories, repeatable."""
    return click.option(
        "-m", "--memories", "memory_paths", multiple=True, type=click.Path(), help=help
    )


def outside_paths_option(f: Any) -> Any:
    return click.option(
        "--allow-outside-paths",
        is_flag=True,
        help="Let tensor files live outside their memory file's directory.",
    )(f)


def model_options(f: Any = None, *, memory_files: bool = True) -> Any:
    """--device, --dtype, --coordinates, --prepend-bos, --threads and
    --allow-pickle-weights, as every model-loading command takes them. Their values go to
    the click context for :func:`load_cli_model`, so a command's body names none of them.
    ``memory_files``: whether the command reads memory files, whose ``[model]`` table
    gives defaults."""
    files = "the memory files' [model], else " if memory_files else ""

    def decorate(f: Any) -> Any:
        f = quiet_option(f)
        f = click.option(
            "--allow-pickle-weights",
            "allow_pickle_weights",
            is_flag=True,
            expose_value=False,
            callback=_to_meta,
            help="Load a model directory whose weights are pickles (pytorch_model.bin); "
            "refused by default, since unpickling can run code.",
        )(f)
        f = click.option(
            "--threads",
            "threads",
            type=click.IntRange(1, 1024),
            default=None,
            expose_value=False,
            callback=_to_meta,
            help="CPU threads for torch (default: torch's, one per core). On a shared "
            "machine fewer threads are often much faster.",
        )(f)
        f = click.option(
            "--prepend-bos/--no-prepend-bos",
            "prepend_bos",
            default=None,
            expose_value=False,
            callback=_to_meta,
            help=f"Put the BOS token before prompts (default: {files}the model source's "
            "convention; TransformerLens's 'prepend' for other models).",
        )(f)
        f = click.option(
            "--coordinates",
            type=click.Choice(COORDINATES),
            default=None,
            expose_value=False,
            callback=_to_meta,
            help="Weight coordinates: processed (the paper's HookedTransformer: LayerNorm "
            f"folded, weights centred) or raw (default: {files}processed).",
        )(f)
        f = click.option(
            "--dtype",
            type=click.Choice(DTYPES),
            default=None,
            expose_value=False,
            callback=_to_meta,
            help="Model dtype (default float32).",
        )(f)
        f = click.option(
            "--device",
            default=None,
            expose_value=False,
            callback=_to_meta,
            help="cpu, cuda, cuda:1 … (default: auto).",
        )(f)
        return f

    return decorate(f) if f is not None else decorate


def _quiet(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    from meminject import progress

    if value:
        progress.enable(False)
    ctx.meta["meminject_quiet"] = bool(value)


def quiet_option(f: Any) -> Any:
    """``-q/--quiet``: no first-use notes and no progress on standard error (the command
    line shows them otherwise; live progress only on a terminal)."""
    return click.option(
        "-q",
        "--quiet",
        cls=AliasOption,
        old_names=("--no-progress",),
        is_flag=True,
        expose_value=False,
        callback=_quiet,
        help="No progress or first-use notes on standard error (live progress is shown on "
        "a terminal only).",
    )(f)


def show_progress() -> bool:
    """Whether this command shows progress (``--quiet`` not given)."""
    from meminject import progress

    return progress.enabled()


def model_flag(name: str) -> Any:
    """One of the model options this command was given (``threads``,
    ``allow_pickle_weights``, …; None when not given), for a command that hands it on,
    as ``sweep --executor ray`` does to its workers."""
    return click.get_current_context().meta.get(f"meminject_{name}")


def load_cli_model(model_name: str | None, memory_set: Any, *, bridge: bool = False) -> Any:
    """The model a command runs on: :func:`meminject.loading.load_model` with the
    command's flags and its memory set, whose ``[model]`` table gives the defaults the
    flags leave open (the same rule the Python API follows). ``bridge``: the command
    works through TransformerBridge throughout (see ``load_model``). A model that had to
    load through the bridge (an architecture meminject does not process itself) leaves
    its served snapshot for the next command, so that one loads light."""
    from meminject import snapshots
    from meminject.loading import load_model

    meta = click.get_current_context().meta
    threads = meta.get("meminject_threads")
    if threads is not None:
        import torch

        torch.set_num_threads(int(threads))
    model = load_model(
        model_name,
        memories=memory_set,
        device=meta.get("meminject_device"),
        dtype=meta.get("meminject_dtype"),
        coordinates=meta.get("meminject_coordinates"),
        prepend_bos=meta.get("meminject_prepend_bos"),
        allow_pickle_weights=bool(meta.get("meminject_allow_pickle_weights", False)),
        bridge=bridge,
    )
    if not bridge and model.has_bridge:
        snapshots.write(model)
    return model
