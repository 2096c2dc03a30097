"""One vocabulary across commands (issue 29): every option of every command, walked from
the click group (no model), against the table in docs/architecture.md
("Command-line vocabulary"). A new option must be added there, after checking the idea
has no name yet; one name has one kind of value everywhere; old spellings (synonyms of
a current name) stay hidden aliases and are nobody's current name.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import click
import pytest

from meminject.cli import cli
from meminject.cli.options import AliasOption, current_names
from tests.doc_blocks import DOCS

NAME = re.compile(r"`(-{1,2}[a-zA-Z][\w-]*)`")


def vocabulary() -> tuple[dict[str, set[str]], set[str]]:
    """(name → its old spellings, for the table's rows; names of one command only)."""
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    section = text.split("### Command-line vocabulary", 1)[1].split("\n## ", 1)[0]
    shared: dict[str, set[str]] = {}
    for line in section.splitlines():
        if not line.startswith("| `-"):
            continue
        names_cell, _meaning, old_cell = (c.strip() for c in line.strip("|").split("|"))
        old = set(NAME.findall(old_cell))
        for name in NAME.findall(names_cell):
            shared[name] = old
    paragraph = section.split("Options of one command only", 1)[1].split("\n\n", 1)[0]
    return shared, set(NAME.findall(paragraph))


def options_of(group: click.Command) -> list[tuple[str, click.Option]]:
    """(command path, option) of every option of ``group`` and its commands, nested."""
    found: list[tuple[str, click.Option]] = []

    def walk(command: click.Command, path: str) -> None:
        found.extend(
            (path, p) for p in command.params if isinstance(p, click.Option) and p.name != "help"
        )
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, f"{path} {name}")

    walk(group, "meminject")
    return found


def kind(option: click.Option) -> str:
    """What an option takes, so one name means one kind of thing everywhere."""
    if option.is_flag and not option.secondary_opts:
        return "flag"
    if option.is_flag:
        return "on/off flag"
    if getattr(option, "_flag_needs_value", False):
        return "optional value"
    return "repeatable value" if option.multiple else "value"


def problems(group: click.Command) -> list[str]:
    """Every way ``group``'s options break the documented vocabulary."""
    shared, single = vocabulary()
    options = options_of(group)
    found: list[str] = []
    current = {name for _, option in options for name in current_names(option)}
    kinds: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    where: dict[str, set[str]] = defaultdict(set)
    for path, option in options:
        names = current_names(option)
        for name in [*names, *option.secondary_opts]:
            if name not in shared and name not in single and name not in ("-h", "--help"):
                found.append(f"{path} {name}: not in the vocabulary")
        for name in names:
            kinds[name][kind(option)].append(path)
            where[name].add(path)
        old = set(option.opts) - set(names)
        allowed = set().union(*(shared.get(n, set()) for n in names))
        found += [f"{path} {o}: an old spelling not listed for {names}" for o in old - allowed]
        for name in names:
            for other, olds in shared.items():
                if name in olds and name not in allowed:
                    found.append(f"{path} {name}: an old spelling of {other}")
        found += [f"{path} {o}: an old spelling in use elsewhere" for o in old & current]
        record = option.get_help_record(click.Context(click.Command("x")))
        if record is not None:
            shown = [o for o in old if re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", record[0])]
            found += [f"{path} {o}: an old spelling shown in help" for o in shown]
    found += [
        f"{name}: one name, several kinds of value {dict(by_kind)}"
        for name, by_kind in kinds.items()
        if len(by_kind) > 1
    ]
    found += [
        f"{name}: listed for one command but on {sorted(paths)}"
        for name, paths in where.items()
        if name in single and len(paths) > 1
    ]
    return found


def test_every_command_follows_the_vocabulary() -> None:
    assert problems(cli) == []


def test_the_check_finds_each_kind_of_inconsistency() -> None:
    """A made-up group with one of each mistake the test exists to catch."""

    @click.group()
    def group() -> None: ...

    @group.command()
    @click.option("--out")  # a synonym of -o/--output, shown
    @click.option("--tokens", type=int)  # a synonym of --max-new-tokens
    @click.option("--heads", is_flag=True)  # --heads takes an optional SPEC elsewhere
    @click.option("--frobnicate")  # a new idea, not in the table
    @click.option("--compare", is_flag=True)  # generate's own option, on a second command
    def one(**kwargs: Any) -> None: ...

    @group.command()
    @click.option("--heads", is_flag=False, flag_value="all", default=None)
    @click.option("--compare", is_flag=True)
    @click.option("--show-top", cls=AliasOption, old_names=("--top-k",), type=int)
    def two(**kwargs: Any) -> None: ...

    found = "\n".join(problems(group))
    for expected in (
        "meminject one --out: not in the vocabulary",
        "meminject one --out: an old spelling of -o",
        "meminject one --tokens: an old spelling of --max-new-tokens",
        "meminject one --frobnicate: not in the vocabulary",
        "--heads: one name, several kinds of value",
        "--compare: listed for one command but on",
        "meminject two --top-k: an old spelling not listed",
    ):
        assert expected in found, (expected, found)


@pytest.mark.parametrize(
    ("command", "args", "name", "value"),
    [
        ("export", ["--out", "x.gguf", "m.toml"], "output", "x.gguf"),
        ("schema", ["--out", "x.json"], "output", "x.json"),
        ("evaluate", ["--tokens", "3", "m.toml", "--target", "x"], "max_new_tokens", 3),
        ("sweep", ["--top", "3", "toyworld"], "top", 3),
        ("learn", ["--out", "x.toml", "p", "--target", "t", "--layer", "1"], "output", "x.toml"),
    ],
)
def test_old_spellings_still_parse(command: str, args: list[str], name: str, value: Any) -> None:
    ctx = cli.commands[command].make_context(command, args, resilient_parsing=True)
    assert str(ctx.params[name]) == str(value)


def test_the_target_rule_is_stated_in_help_wherever_text_follows_a_prompt() -> None:
    from meminject.cli.options import CONTINUATION_RULE

    for command, name in (("learn", "--target"), ("evaluate", "--target"), ("inspect", "--token")):
        (option,) = [p for p in cli.commands[command].params if name in p.opts]
        assert CONTINUATION_RULE in (option.help or ""), command
