"""The committed JSON Schema (memories/memory.schema.json) matches the code, and every
example memory file validates."""

from __future__ import annotations

import json
from pathlib import Path

from meminject.memfile import load_memory_set
from meminject.plugins import build_registry
from meminject.schema import json_schema

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "memories" / "memory.schema.json"


def test_committed_schema_is_current() -> None:
    current = json_schema(build_registry(load_entrypoints=False).file_model)
    committed = json.loads(SCHEMA.read_text(encoding="utf-8"))
    assert committed == current, "regenerate: meminject --no-plugins schema -o " + str(SCHEMA)


def test_example_memory_files_validate_and_point_at_the_schema() -> None:
    files = sorted((ROOT / "memories").rglob("*.toml"))
    assert len(files) >= 5
    registry = build_registry(load_entrypoints=False)
    for path in files:
        load_memory_set([path], registry)
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("#:schema ") and first.endswith("memory.schema.json"), path
        assert (path.parent / first.split(" ", 1)[1]).resolve() == SCHEMA.resolve(), path
