"""One vocabulary across commands (issue 29): every option of every command, walked from
the click group (no model), against the table in docs/architecture.md
("Command-line vocabulary"). A new option must be added there, after checking the idea
has no name yet; one name has one kind of value everywhere; old spellings stay hidden.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import click
import pytest

from meminject.cli import cli
from meminject.cli.options import current_names
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


def commands() -> list[tuple[str, click.Command]]:
    found: list[tuple[str, click.Command]] = []

    def walk(command: click.Command, path: str) -> None:
        found.append((path, command))
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, f"{path} {name}".strip())

    walk(cli, "meminject")
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


def options() -> list[tuple[str, click.Option]]:
    return [
        (path, p)
        for path, command in commands()
        for p in command.params
        if isinstance(p, click.Option) and p.name != "help"
    ]


def test_every_option_is_in_the_vocabulary() -> None:
    shared, single = vocabulary()
    missing = sorted(
        {
            f"{path} {name}"
            for path, option in options()
            for name in current_names(option) + list(option.secondary_opts)
            if name not in shared and name not in single and name not in ("-h", "--help")
        }
    )
    assert not missing, (
        f"options not in docs/architecture.md's command-line vocabulary: {missing}; add "
        "each after checking that the idea has no name there yet"
    )


def test_an_option_of_one_command_is_on_one_command_only() -> None:
    _, single = vocabulary()
    where: dict[str, set[str]] = defaultdict(set)
    for path, option in options():
        for name in current_names(option):
            where[name].add(path)
    shared_now = {name: sorted(paths) for name, paths in where.items() if name in single}
    assert all(len(paths) == 1 for paths in shared_now.values()), {
        name: paths for name, paths in shared_now.items() if len(paths) > 1
    }


def test_one_name_has_one_kind_everywhere() -> None:
    kinds: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path, option in options():
        for name in current_names(option):
            kinds[name][kind(option)].append(path)
    mixed = {name: dict(by_kind) for name, by_kind in kinds.items() if len(by_kind) > 1}
    assert not mixed, f"one option name, several kinds of value: {mixed}"


def test_old_spellings_are_hidden_aliases_of_the_documented_option() -> None:
    shared, _ = vocabulary()
    current = {name for _, option in options() for name in current_names(option)}
    for path, option in options():
        old = set(option.opts) - set(current_names(option))
        allowed = set().union(*(shared.get(n, set()) for n in current_names(option)))
        assert old <= allowed, f"{path}: {sorted(old - allowed)} not listed as old spellings"
        assert not old & current, f"{path}: old spelling {sorted(old & current)} is in use"
        ctx = click.Context(click.Command("x"))
        record = option.get_help_record(ctx)
        assert record is None or not any(
            re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", record[0]) for o in old
        ), (path, record)


@pytest.mark.parametrize(
    ("command", "args", "name", "value"),
    [
        ("export", ["--out", "x.gguf"], "output", "x.gguf"),
        ("schema", ["--out", "x.json"], "output", "x.json"),
        ("evaluate", ["--tokens", "3"], "max_new_tokens", 3),
        ("sweep", ["--top", "3"], "top", 3),
    ],
)
def test_old_spellings_still_parse(command: str, args: list[str], name: str, value: Any) -> None:
    cmd = cli.commands[command]
    ctx = cmd.make_context(command, [*args, *_required(command)], resilient_parsing=True)
    assert str(ctx.params[name]) == str(value)


def _required(command: str) -> list[str]:
    return {
        "export": ["m.toml"],
        "evaluate": ["m.toml", "--target", "x"],
        "sweep": ["toyworld"],
        "schema": [],
    }[command]


def test_the_target_rule_is_stated_in_help_wherever_text_follows_a_prompt() -> None:
    from meminject.cli.options import CONTINUATION_RULE

    for command, name in (("learn", "--target"), ("evaluate", "--target"), ("inspect", "--token")):
        (option,) = [p for p in cli.commands[command].params if name in p.opts]
        assert CONTINUATION_RULE in (option.help or ""), command
