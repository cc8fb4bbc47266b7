"""SkipPolicy: what a request asks of FFN skipping, parsed, validated and resolved.

One policy reaches the engine in three layers, later ones overriding earlier ones:
the built-in defaults, the server default (``--additional-config '{"ffnskip": {...}}'``,
optionally through a ``policy_file`` with per-layer thresholds), and the request's own
``SamplingParams.extra_args`` (OpenAI field ``vllm_xargs``).

The API server resolves the three into one plain dict (``SkipPolicy.to_wire``) stored in the
request's ``extra_args`` under ``RESOLVED_KEY``; the scheduler (prefix-cache keys) and the
workers (skip decisions) read only that. This module imports nothing of vLLM or of ours.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

#: extra_args key holding the resolved policy; written by the API server, never by users.
RESOLVED_KEY = "ffnskip_resolved"
#: extra_args key holding the caller's request id, so per-request statistics can be found.
REQUEST_ID_KEY = "ffnskip_request_id"

#: Per-request keys (``vllm_xargs``) and the SkipPolicy field each one sets.
REQUEST_KEYS: dict[str, str] = {
    "ffnskip": "enabled",
    "ffnskip_threshold": "threshold",
    "ffnskip_warmup": "warmup",
    "ffnskip_cold_start": "cold_start",
    "ffnskip_cold_end": "cold_end",
    "ffnskip_span": "span",
    "ffnskip_layer_thresholds": "layer_thresholds",
}
#: Server-config keys (``--additional-config '{"ffnskip": {...}}'``) beside the policy fields.
SERVER_KEYS = (
    "enabled", "threshold", "warmup", "cold_start", "cold_end", "span", "policy_file",
    "max_skip_rows", "wide_skip_rows",
)  # fmt: skip
#: Server keys that shape passes (which compiled graph a pass runs), not the policy.
PASS_KEYS = ("max_skip_rows", "wide_skip_rows")
#: Under vLLM's V1 runner (the CPU), the most rows a pass may have and still run the
#: skip-aware graph; a larger pass, or one with a row that cannot skip, runs the dense graph
#: (0: every pass with an eligible token runs the skip graph, the rule applied exactly).
#: There a layer saves only when every row of the pass skips it: served on the embedded model
#: (docs/results.md §4), skipping gained 1.14x at 1 concurrent request, 1.07x at 2, nothing at
#: 4 and lost 3% at 8.
DEFAULT_MAX_SKIP_ROWS = 2
#: Under V1, a pass wider than ``max_skip_rows`` still runs the skip-aware graph when at least
#: this many of its tokens may skip (0: never). There the ``gather`` form gathers the rows that run
#: a layer, so skipped rows save their FFN compute. Off by default: served on the embedded
#: model on 2 cores (docs/results.md §4) it gained nothing measurable at 32 and 64 concurrent
#: requests (1.01x, 1.04x, within the ±10% noise) and may have lost at 16 (0.92x).
DEFAULT_WIDE_SKIP_ROWS = 0
#: Keys a policy file may hold.
FILE_KEYS = ("threshold", "layer_thresholds", "warmup", "cold_start", "cold_end", "span")


class PolicyError(ValueError):
    """An invalid policy value; ``field`` names the offending key as the user wrote it."""

    def __init__(self, field: str, message: str, value: Any = None) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.value = value


@dataclass(frozen=True)
class SkipPolicy:
    """The FFN-SkipLLM rule's knobs for one request (see docs/algorithm.md).

    ``layer_thresholds`` (one per layer, from a calibrated policy file) takes precedence over
    ``threshold``; a request that sets ``ffnskip_threshold`` replaces both with one value.
    """

    enabled: bool = True
    #: Conservative for a model nobody calibrated (docs/results.md §3): on the embedded model
    #: even 0.985 skips ~5% at no measured loss; ``vllm-ffnskip calibrate`` finds the most a
    #: given model allows.
    threshold: float = 0.99
    warmup: int = 2
    cold_start: int = 2
    cold_end: int = 2
    span: int = 1
    layer_thresholds: tuple[float, ...] | None = field(default=None)

    def thresholds(self, num_layers: int) -> list[float]:
        """The threshold of every layer (cold layers included; they never trigger)."""
        if self.layer_thresholds is not None:
            return list(self.layer_thresholds)
        return [self.threshold] * num_layers

    def validate_for(self, num_layers: int, field_names: Mapping[str, str] = {}) -> None:
        """Checks that need the model: cold regions must leave a hot layer, per-layer
        thresholds must match the layer count. ``field_names`` maps a policy field to the
        key the user wrote, so the error names a key they sent."""
        if self.cold_start + self.cold_end >= num_layers:
            name = field_names.get("cold_start") or field_names.get("cold_end") or "cold_start"
            raise PolicyError(
                name,
                f"cold regions ({self.cold_start} + {self.cold_end} layers) cover all "
                f"{num_layers} layers of the model; nothing could be skipped",
                self.cold_start + self.cold_end,
            )
        if self.layer_thresholds is not None and len(self.layer_thresholds) != num_layers:
            raise PolicyError(
                field_names.get("layer_thresholds", "layer_thresholds"),
                f"has {len(self.layer_thresholds)} entries, the model has {num_layers} layers",
            )

    def to_wire(self, num_layers: int) -> dict[str, Any]:
        """Plain-data form carried in ``extra_args`` across processes."""
        return {
            "thresholds": self.thresholds(num_layers),
            "warmup": self.warmup,
            "cold_start": self.cold_start,
            "cold_end": self.cold_end,
            "span": self.span,
        }


def _check_int(name: str, value: Any, minimum: int) -> int:
    # bool is an int subclass; "ffnskip_warmup": true is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(name, f"must be an integer >= {minimum}, got {value!r}", value)
    if value < minimum or value > 1_000_000:
        raise PolicyError(name, f"must be an integer in [{minimum}, 1000000], got {value}", value)
    return value


def _check_threshold(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PolicyError(name, f"must be a number in (0, 1], got {value!r}", value)
    value = float(value)
    if math.isnan(value) or not 0.0 < value <= 1.0:
        raise PolicyError(name, f"must be a number in (0, 1], got {value}", value)
    return value


def _check_enabled(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise PolicyError(name, f"must be 0 or 1 (or a boolean), got {value!r}", value)


def _check_thresholds(name: str, values: Any) -> tuple[float, ...]:
    if not isinstance(values, list) or not values:
        raise PolicyError(name, f"must be a non-empty list of numbers in (0, 1], got {values!r}")
    checked = []
    for i, value in enumerate(values):
        try:
            checked.append(_check_threshold(f"{name}[{i}]", value))
        except PolicyError as e:  # the field is the key that was sent; the entry is in the text
            raise PolicyError(name, str(e), value) from e
    return tuple(checked)


def _field_value(field_name: str, key: str, value: Any) -> Any:
    if field_name == "layer_thresholds":
        return _check_thresholds(key, value)
    if field_name == "enabled":
        return _check_enabled(key, value)
    if field_name == "threshold":
        return _check_threshold(key, value)
    if field_name == "span":
        return _check_int(key, value, 1)
    return _check_int(key, value, 0)


#: The policy files that ship with the package, selectable by name (``policy_file``).
POLICIES_DIR = Path(__file__).resolve().parent / "policies"


def policy_path(name: str | Path) -> Path:
    """A policy file's path: a shipped policy's bare name (``smollm2-135m-instruct-aggressive``)
    names ``policies/<name>.json``; anything else is a path."""
    shipped = POLICIES_DIR / f"{name}.json"
    if "/" not in str(name) and not str(name).endswith(".json") and shipped.exists():
        return shipped
    return Path(name)


def load_policy_file(path: str | Path, base: SkipPolicy = SkipPolicy()) -> SkipPolicy:
    """Read a calibrated policy file (JSON written by ``vllm-ffnskip calibrate``), by path or
    by a shipped policy's name."""
    path = policy_path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PolicyError("policy_file", f"cannot read {path}: {e}", str(path)) from e
    return policy_from_dict(data, str(path), base)


def policy_from_dict(data: Any, source: str, base: SkipPolicy = SkipPolicy()) -> SkipPolicy:
    """A policy file's contents (``source`` names it in errors)."""
    if not isinstance(data, dict):
        raise PolicyError("policy_file", f"{source} must hold a JSON object", source)
    unknown = sorted(set(data) - set(FILE_KEYS) - {"model", "calibration"})
    if unknown:
        raise PolicyError("policy_file", f"{source}: unknown keys {unknown}", source)
    updates: dict[str, Any] = {}
    for key in FILE_KEYS:
        if key not in data:
            continue
        try:
            updates[key] = _field_value(key, key, data[key])
        except PolicyError as e:
            raise PolicyError("policy_file", f"{source}: {e}", source) from e
    return replace(base, **updates)


def parse_server_config(config: Any, base: SkipPolicy = SkipPolicy()) -> SkipPolicy:
    """The server default from ``additional_config["ffnskip"]`` (None: the base policy)."""
    if config is None:
        return base
    if not isinstance(config, dict):
        raise PolicyError("ffnskip", f"must be a JSON object, got {config!r}", config)
    unknown = sorted(set(config) - set(SERVER_KEYS))
    if unknown:
        raise PolicyError(f"ffnskip.{unknown[0]}", f"unknown key (known: {list(SERVER_KEYS)})")
    policy = base
    if "policy_file" in config:
        if not isinstance(config["policy_file"], str):
            raise PolicyError("ffnskip.policy_file", "must be a path string")
        policy = load_policy_file(config["policy_file"], policy)
    max_skip_rows(config), wide_skip_rows(config)  # validated at start, with the policy
    updates = {
        key: _field_value(key, f"ffnskip.{key}", config[key])
        for key in SERVER_KEYS
        if key in config and key != "policy_file" and key not in PASS_KEYS
    }
    if "threshold" in updates:
        updates["layer_thresholds"] = None
    return replace(policy, **updates)


def max_skip_rows(config: Mapping[str, Any] | None) -> int:
    """The server's ``max_skip_rows`` (``DEFAULT_MAX_SKIP_ROWS`` when unset)."""
    value = (config or {}).get("max_skip_rows", DEFAULT_MAX_SKIP_ROWS)
    return _check_int("ffnskip.max_skip_rows", value, 0)


def wide_skip_rows(config: Mapping[str, Any] | None) -> int:
    """The server's ``wide_skip_rows`` (``DEFAULT_WIDE_SKIP_ROWS`` when unset)."""
    value = (config or {}).get("wide_skip_rows", DEFAULT_WIDE_SKIP_ROWS)
    return _check_int("ffnskip.wide_skip_rows", value, 0)


def runs_wide_passes(config: Mapping[str, Any] | None) -> bool:
    """Whether the server runs passes wider than ``max_skip_rows`` in the skip graph (the
    rule in every pass, or ``wide_skip_rows`` set): then its layers gather running rows."""
    return not max_skip_rows(config) or wide_skip_rows(config) > 0


def parse_request(
    extra_args: Mapping[str, Any] | None, default: SkipPolicy, num_layers: int
) -> SkipPolicy:
    """The request's policy: the server default overridden by its ``ffnskip*`` keys,
    validated for a model of ``num_layers`` layers.

    Keys not starting with ``ffnskip`` belong to others and are left alone; an unknown
    ``ffnskip*`` key is an error (a typo must not silently fall back to the default).
    """
    updates: dict[str, Any] = {}
    sent: dict[str, str] = {}
    for key, value in (extra_args or {}).items():
        if not key.startswith("ffnskip"):
            continue
        field_name = REQUEST_KEYS.get(key)
        if field_name is None:
            raise PolicyError(key, f"unknown key (known: {sorted(REQUEST_KEYS)})")
        updates[field_name] = _field_value(field_name, key, value)
        sent[field_name] = key
    if "threshold" in updates and "layer_thresholds" in updates:
        raise PolicyError(
            "ffnskip_layer_thresholds", "set either ffnskip_threshold or ffnskip_layer_thresholds"
        )
    if "threshold" in updates:
        updates["layer_thresholds"] = None
    policy = replace(default, **updates) if updates else default
    policy.validate_for(num_layers, sent)
    return policy
