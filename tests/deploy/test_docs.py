"""docs/deploy.md documents every key of values.yaml, with its default, and no other key."""

from __future__ import annotations

import json
import re
from typing import Any, Iterator

import yaml

from .conftest import CHART, REPO

DOC = REPO / "docs" / "deploy.md"
ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|\s*`([^`]*)`\s*\|(.*)\|\s*$")


def leaves(values: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Dotted paths of the leaves: scalars, lists and empty maps (non-empty maps recurse)."""
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from leaves(value, path + ".")
        else:
            yield path, value


def documented() -> dict[str, tuple[str, str]]:
    rows: dict[str, tuple[str, str]] = {}
    for line in DOC.read_text().splitlines():
        m = ROW.match(line)
        if m:
            key, default, description = m.groups()
            assert key not in rows, f"{key} documented twice"
            rows[key] = (default, description.strip())
    return rows


def test_values_table_in_sync():
    values = dict(leaves(yaml.safe_load((CHART / "values.yaml").read_text())))
    rows = documented()
    missing = sorted(set(values) - set(rows))
    stale = sorted(set(rows) - set(values))
    assert not missing, f"keys of values.yaml missing from the table in docs/deploy.md: {missing}"
    assert not stale, f"keys in docs/deploy.md that values.yaml no longer has: {stale}"
    for key, value in values.items():
        default, description = rows[key]
        # Strings are written bare (`""` for empty), everything else as JSON.
        if isinstance(value, str):
            assert default == (value or '""'), f"{key}: docs say `{default}`, values.yaml has {value!r}"
        else:
            assert json.loads(default) == value, f"{key}: docs say `{default}`, values.yaml has {value!r}"
        assert description, f"{key} has no description"


def test_required_top_level_keys_documented():
    rows = documented()
    for key in ("model", "tensorParallelSize", "pipelineParallelSize", "apiKeySecret",
                "multiNode.enabled", "multiNode.size", "ffnskip.threshold"):
        assert key in rows


def test_pitfalls_listed():
    text = DOC.read_text()
    for needle in ("enableServiceLinks: false", "VLLM_PORT", "/dev/shm", "Startup probe", "runtimeClassName",
                   "plugin in every pod image", "idempotent", "helm upgrade", "vllm_xargs"):
        assert needle in text, needle
