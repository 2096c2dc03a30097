"""MkDocs hooks that generate meminject's reference pages from the code, at build time.

Hand-copied references drift: a field gets a new default, a command a new option, and
the page keeps describing the old one. So nothing here is written down twice:

- ``reference/memory-file.md`` is rendered from the JSON Schema of the memory file
  model that the built-in plugins assemble (``build_registry(load_entrypoints=False)``),
  the same schema ``meminject --no-plugins schema`` prints and
  ``memories/memory.schema.json`` holds;
- ``reference/memory.schema.json`` is that schema, downloadable, and
  ``reference/generation.schema.json`` the schema of ``generate --json``'s lines;
- ``reference/cli.md`` walks the click group ``meminject.cli.cli`` and renders each
  command's usage, help and options as ``--help`` would show them;
- in any page, ``<!-- api: dotted.name -->`` becomes the signature and docstring of a
  Python object, ``<!-- table: sites -->`` the sites table of ``meminject.sites``, and
  ``<!-- fields: module:Model -->`` a table of a pydantic model's
  fields (used for the example plugins' parameter models).

The functions are plain (no MkDocs types) so tests can call them without a build.
Imports of meminject are light: nothing here loads torch.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

GENERATED_NOTE = (
    '!!! note "Generated"\n    This page is generated from the code on every documentation '
    "build ({source}); do not edit it by hand.\n"
)


# --- memory file reference -------------------------------------------------------------


def _registry() -> Any:
    from meminject.plugins import build_registry

    return build_registry(load_entrypoints=False)


def schema_json() -> str:
    """The memory file's JSON Schema for the built-in plugins, as committed."""
    from meminject.schema import json_schema

    return json.dumps(json_schema(_registry().file_model), indent=2, ensure_ascii=False) + "\n"


def generation_schema_json() -> str:
    """The JSON Schema of one line of ``generate --json`` (``schema --generation``)."""
    from meminject.schema import generation_json_schema

    return json.dumps(generation_json_schema(), indent=2, ensure_ascii=False) + "\n"


def _cell(text: str) -> str:
    """Table cells cannot hold newlines or bare pipes."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _constraints(schema: dict[str, Any]) -> list[str]:
    parts = []
    for key, symbol in (
        ("minimum", "≥"),
        ("exclusiveMinimum", ">"),
        ("maximum", "≤"),
        ("exclusiveMaximum", "<"),
    ):
        if key in schema:
            parts.append(f"{symbol} {schema[key]}")
    if "maxLength" in schema:
        parts.append(f"{schema.get('minLength', 0)}–{schema['maxLength']} characters")
    elif "minLength" in schema:
        parts.append(f"at least {schema['minLength']} character{'s' * (schema['minLength'] != 1)}")
    if "minItems" in schema:
        parts.append(f"at least {schema['minItems']}")
    if "pattern" in schema:
        parts.append(f"matching `{schema['pattern']}`")
    return parts


def type_text(schema: dict[str, Any], anchors: dict[str, str]) -> str:
    """A JSON Schema type in words: ``integer ≥ 0``, ``one of "all", "last"``, a link."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{anchors.get(name, name)}](#{_slug(anchors.get(name, name))})"
    if "const" in schema:
        return f"`{json.dumps(schema['const'], ensure_ascii=False)}`"
    if "enum" in schema:
        return "one of " + ", ".join(
            f"`{json.dumps(v, ensure_ascii=False)}`" for v in schema["enum"]
        )
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = [s for s in schema[key] if s.get("type") != "null"]
            return " or ".join(type_text(s, anchors) for s in options)
    kind = schema.get("type")
    if kind == "array":
        text = "list of " + type_text(schema.get("items", {}), anchors)
    elif kind == "object":
        text = "table"
    else:
        text = str(kind or "any")
    extra = _constraints(schema)
    return text + (f" ({', '.join(extra)})" if extra else "")


def _slug(text: str) -> str:
    """The anchor Python-Markdown's toc extension gives a heading."""
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _default(schema: dict[str, Any], required: bool) -> str:
    if required:
        return "**required**"
    if "default" not in schema or schema["default"] is None:
        return "optional"
    return f"`{json.dumps(schema['default'], ensure_ascii=False)}`"


def fields_table(schema: dict[str, Any], anchors: dict[str, str]) -> str:
    """A markdown table of an object schema's properties."""
    required = set(schema.get("required", ()))
    rows = ["| field | type | default | description |", "| --- | --- | --- | --- |"]
    for name, prop in schema.get("properties", {}).items():
        rows.append(
            "| "
            + " | ".join(
                [
                    f"`{name}`",
                    _cell(type_text(prop, anchors)),
                    _default(prop, name in required),
                    _cell(prop.get("description", "")),
                ]
            )
            + " |"
        )
    return "\n".join(rows) + "\n"


def _first_paragraph(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return docstring_markdown(doc.split("\n\n")[0]).replace("\n", " ")


def memory_file_reference() -> str:
    """The memory file reference page (markdown)."""
    from meminject.schema import json_schema

    registry = _registry()
    schema = json_schema(registry.file_model)
    defs = schema.get("$defs", {})
    anchors = {"ModelInfo": "[model]"}
    strategy_of = {}
    for name, entry in registry.strategies.items():
        strategy_of[entry.strategy_cls.memory_model.__name__] = name
        anchors[entry.strategy_cls.memory_model.__name__] = f'strategy = "{name}"'

    out = [
        "# Memory file reference\n",
        GENERATED_NOTE.format(
            source="the pydantic models in `meminject/schema.py`, through the built-in plugins"
        ),
        "A memory file is TOML. This page lists every field the built-in encoders and "
        "strategies accept; see [Memory files](../memory-files.md) for a guided tour. "
        "Installed plugins add strategies, encoders and encoder parameters: "
        "`meminject schema` prints the JSON Schema of what is installed right now, and "
        "`meminject --no-plugins schema` the built-ins' schema that this page renders.\n",
        "The same schema is committed as `memories/memory.schema.json` (a test keeps it "
        "current) and can be downloaded here: [memory.schema.json](memory.schema.json). "
        "Editors that understand `#:schema` comments (Taplo, Even Better TOML) validate "
        "and complete a file whose first line points at it:\n",
        "```toml\n#:schema ../memory.schema.json\nversion = 1\n```\n",
        "Unknown keys are errors, and values are not converted between types "
        '(`enabled = "no"` or `tau = "2"` are rejected).\n',
        "## Top level\n",
        fields_table(schema, anchors),
        "## [model]\n",
        _first_paragraph(importlib.import_module("meminject.schema").ModelInfo) + "\n",
        fields_table(defs["ModelInfo"], anchors),
        "## [[memory]]\n",
        "Each `[[memory]]` table is one memory. Its `strategy` decides which fields it has; "
        "a table without `strategy` is an `add` memory. Names are unique across a memory "
        "set (all files and directories given together).\n",
    ]
    for def_name, strategy in strategy_of.items():
        model = registry.strategies[strategy].strategy_cls.memory_model
        out.append(f'### strategy = "{strategy}"\n')
        out.append(_first_paragraph(model) + "\n")
        out.append(fields_table(defs[def_name], anchors))
    out.append("## Encoders\n")
    out.append(
        "`encoding` names the encoder that turns a memory's `text` into a vector. "
        "Encoders that take parameters read them from the memory's `[memory.params]` "
        "table.\n"
    )
    out += [f"- `{n}` — {_first_paragraph(e.encoder)}" for n, e in registry.encoders.items()]
    out.append("")
    with_params = {n: e for n, e in registry.encoders.items() if e.params_model is not None}
    for name, entry in with_params.items():
        out.append(f'### encoding = "{name}": [memory.params]\n')
        out.append(model_fields_table(entry.params_model))
    if not with_params:
        out.append(
            "No built-in encoder takes parameters, so built-in memories have no "
            "`[memory.params]` table; plugins' encoders may (see "
            "[the contrast example](../plugins/examples.md)).\n"
        )
    out.append("## Strategies\n")
    out += [f"- `{n}` — {_first_paragraph(e.strategy_cls)}" for n, e in registry.strategies.items()]
    out.append("")
    out.append("## Sites\n")
    out.append(
        "`site` is where a vector is added; each site is a TransformerLens hook point of "
        "layer ℓ. Text memories need a site of the model's width; gated memories may also "
        "use `attn_z` (per head) and `mlp_post` (the MLP's hidden width).\n"
    )
    out.append(sites_table())
    return "\n".join(out) + "\n"


def sites_table() -> str:
    """The sites table of :mod:`meminject.sites`, as markdown (the memory file reference
    and the hook reference both show it)."""
    from meminject.sites import table_rows

    out = ["| site | hook point | width | writes the residual stream | what |", "| --- " * 5 + "|"]
    for row in table_rows():
        width = {"d_model": "d_model", "d_mlp": "d_mlp", "heads": "n_heads × d_head"}[row["width"]]
        if row["per_head"]:
            width = "n_heads × d_model"
        writes = "yes" if row["writes_residual"] else "no"
        out.append(
            f"| `{row['site']}` | `{row['hook']}` | {width} | {writes} | {row['description']} |"
        )
    return "\n".join(out) + "\n"


def model_fields_table(model: Any) -> str:
    """A fields table for one pydantic model."""
    schema = model.model_json_schema()
    return fields_table(schema, {})


# --- command line reference ------------------------------------------------------------


def _help_text(text: str | None) -> str:
    if not text:
        return ""
    lines = [line for line in inspect.cleandoc(text).splitlines() if line.strip() != "\b"]
    return "\n".join(lines).strip()


def _command_section(name: str, command: Any, parent: Any) -> list[str]:
    import click

    ctx = click.Context(command, info_name=name, parent=parent)
    out = [f"## meminject {name}\n", f"```\n{command.get_usage(ctx)}\n```\n"]
    help_text = _help_text(command.help)
    if help_text:
        out.append(help_text + "\n")
    arguments = [p for p in command.params if isinstance(p, click.Argument)]
    if arguments:
        out.append("**Arguments**\n")
        for param in arguments:
            need = "required" if param.required else "optional"
            many = ", repeatable" if param.nargs == -1 else ""
            out.append(f"- `{param.human_readable_name}` ({need}{many})")
        out.append("")
    records = [p.get_help_record(ctx) for p in command.get_params(ctx)]
    options = [
        r
        for p, r in zip(command.get_params(ctx), records, strict=True)
        if r and isinstance(p, click.Option)
    ]
    if options:
        out.append("**Options**\n")
        out += [f"- `{names}` — {docstring_markdown(desc) or '–'}" for names, desc in options]
        out.append("")
    if isinstance(command, click.Group):  # e.g. `meminject models pull`
        for sub in command.list_commands(ctx):
            out += _command_section(f"{name} {sub}", command.get_command(ctx, sub), ctx)
    return out


def cli_reference() -> str:
    """The command line reference page (markdown), from the click group."""
    import click

    from meminject.cli import cli

    root = click.Context(cli, info_name="meminject")
    out = [
        "# Command line reference\n",
        GENERATED_NOTE.format(source="the click commands in `meminject/cli.py`"),
        f"```\n{cli.get_usage(root)}\n```\n",
        _help_text(cli.help) + "\n",
        "**Global options** (before or after the command name)\n",
    ]
    records = [p.get_help_record(root) for p in cli.get_params(root)]
    out += [f"- `{names}` — {desc}" for names, desc in (r for r in records if r)]
    out.append("")
    out.append(
        "Exit codes: 0 success, 1 a runtime failure, 2 bad input (a memory file, an "
        "option, a path). Errors print one line naming the file, line, memory and field; "
        "`--debug` (or `MEMINJECT_DEBUG=1`) shows the traceback instead.\n"
    )
    out.append(
        "`MEMINJECT_LOAD_PLUGINS=a,b` limits which installed plugins load (empty: none). "
        "Plugins can add commands of their own (`register_commands`); `meminject --help` "
        "lists those too, this page only the built-in ones.\n"
    )
    for name in cli.list_commands(root):
        out += _command_section(name, cli.get_command(root, name), root)
    return "\n".join(out) + "\n"


# --- API blocks --------------------------------------------------------------------------

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`~?([^`]+)`")


def docstring_markdown(text: str) -> str:
    """reStructuredText-flavoured docstring text → markdown (roles and ``literals``)."""
    text = _ROLE.sub(lambda m: f"`{m.group(1)}`", text)
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    lines, out, in_doctest = text.splitlines(), [], False
    for line in lines:
        doctest = line.lstrip().startswith((">>>", "... "))
        if doctest and not in_doctest:
            out.append("```pycon")
            in_doctest = True
        elif not doctest and in_doctest:
            out.append("```")
            in_doctest = False
        out.append(line.strip() if doctest else line)
    if in_doctest:
        out.append("```")
    return "\n".join(out)


def _resolve(dotted: str) -> Any:
    """``package.module.attr`` (or ``package.module:attr.sub``) → the object."""
    if ":" in dotted:
        module_name, attr = dotted.split(":", 1)
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # the longest importable prefix is the module
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(f"cannot resolve {dotted!r}")


def signature_text(name: str, obj: Any) -> str:
    """``name(arg: type = default, …) -> type`` with annotations as written (they are
    strings under ``from __future__ import annotations``; nothing is evaluated)."""
    target = obj.__init__ if inspect.isclass(obj) and not _is_dataclass(obj) else obj
    signature = inspect.signature(target)
    params = []
    seen_kw_only = False
    for param in signature.parameters.values():
        if param.name in ("self", "cls") or param.name.startswith("_"):
            continue  # private dataclass fields are not part of the API
        text = param.name
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            text = "*" + text
            seen_kw_only = True
        elif param.kind is inspect.Parameter.VAR_KEYWORD:
            text = "**" + text
        elif param.kind is inspect.Parameter.KEYWORD_ONLY and not seen_kw_only:
            params.append("*")
            seen_kw_only = True
        if param.annotation is not inspect.Parameter.empty:
            text += f": {_annotation(param.annotation)}"
        if param.default is not inspect.Parameter.empty:
            text += f" = {param.default!r}"
        params.append(text)
    ret = ""
    if signature.return_annotation is not inspect.Signature.empty and not inspect.isclass(obj):
        ret = f" -> {_annotation(signature.return_annotation)}"
    one_line = f"{name}({', '.join(params)}){ret}"
    if len(one_line) <= 88:
        return one_line
    return f"{name}(\n" + "".join(f"    {p},\n" for p in params) + f"){ret}"


def _is_dataclass(obj: Any) -> bool:
    return hasattr(obj, "__dataclass_fields__")


def _annotation(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    return getattr(annotation, "__name__", repr(annotation))


def api_block(dotted: str) -> str:
    """Signature and docstring of a Python object, as markdown."""
    obj = _resolve(dotted)
    short = dotted.replace(":", ".").rsplit(".", 1)[-1]
    kind = "class" if inspect.isclass(obj) else "function"
    doc = docstring_markdown(inspect.getdoc(obj) or "")
    return (
        f"### `{dotted.replace(':', '.')}`\n\n"
        f"```python\n{'class ' if kind == 'class' else ''}{signature_text(short, obj)}\n```\n\n"
        f"{doc}\n"
    )


_MARKER = re.compile(r"^<!-- (api|fields|table): (\S+) -->$", re.MULTILINE)


def _plugin_paths() -> None:
    """Let ``fields`` markers name the example plugins even when they are not installed."""
    for path in sorted((ROOT / "plugins").glob("*/pyproject.toml")):
        if str(path.parent) not in sys.path:
            sys.path.append(str(path.parent))


def expand_markers(markdown: str) -> str:
    def replace(match: re.Match[str]) -> str:
        kind, target = match.groups()
        if kind == "api":
            return api_block(target)
        if kind == "table":
            if target != "sites":
                raise ValueError(f"unknown table marker {target!r}")
            return sites_table()
        _plugin_paths()
        return model_fields_table(_resolve(target))

    return _MARKER.sub(replace, markdown)


# --- MkDocs events -----------------------------------------------------------------------

GENERATED_PAGES = {
    "reference/memory-file.md": memory_file_reference,
    "reference/cli.md": cli_reference,
    "reference/memory.schema.json": schema_json,
    "reference/generation.schema.json": generation_schema_json,
}


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for uri, render in GENERATED_PAGES.items():
        files.append(File.generated(config, uri, content=render()))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return expand_markers(markdown)
