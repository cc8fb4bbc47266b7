"""SkipPolicy parsing and validation (no engine)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_ffnskip.policy import (
    REQUEST_KEYS,
    PolicyError,
    SkipPolicy,
    load_policy_file,
    parse_request,
    parse_server_config,
)

DEFAULT = SkipPolicy()
LAYERS = 30


def test_request_keys_override_the_server_default():
    server = parse_server_config({"enabled": False, "threshold": 0.9, "warmup": 4})
    policy = parse_request({"ffnskip": 1, "ffnskip_span": 2, "other_plugin": "x"}, server, LAYERS)
    assert policy == SkipPolicy(enabled=True, threshold=0.9, warmup=4, span=2)


def test_request_threshold_replaces_per_layer_thresholds(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"layer_thresholds": [0.9] * LAYERS, "cold_start": 3}))
    server = parse_server_config({"policy_file": str(path)})
    assert server.thresholds(LAYERS) == [0.9] * LAYERS and server.cold_start == 3
    assert parse_request({"ffnskip_threshold": 0.97}, server, LAYERS).thresholds(LAYERS) == [0.97] * LAYERS


def test_request_layer_thresholds_replace_the_default_and_are_checked():
    thresholds = [1.0, 1.0] + [0.97] * (LAYERS - 4) + [1.0, 1.0]
    policy = parse_request({"ffnskip_layer_thresholds": thresholds}, DEFAULT, LAYERS)
    assert policy.thresholds(LAYERS) == thresholds
    for extra in (
        {"ffnskip_layer_thresholds": thresholds[:-1]},
        {"ffnskip_layer_thresholds": thresholds[:-1] + [1.5]},
        {"ffnskip_layer_thresholds": 0.97},
        {"ffnskip_layer_thresholds": thresholds, "ffnskip_threshold": 0.97},
    ):
        with pytest.raises(PolicyError) as err:
            parse_request(extra, DEFAULT, LAYERS)
        assert err.value.field.startswith("ffnskip_layer_thresholds"), extra


def test_shipped_policies_load_by_name():
    from vllm_ffnskip.policy import POLICIES_DIR

    for path in POLICIES_DIR.glob("*.json"):
        assert load_policy_file(path.stem) == load_policy_file(path)
    with pytest.raises(PolicyError):
        load_policy_file("no-such-policy")


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"ffnskip_threshold": float("nan")}, "ffnskip_threshold"),
        ({"ffnskip_threshold": float("inf")}, "ffnskip_threshold"),
        ({"ffnskip_threshold": 0.0}, "ffnskip_threshold"),
        ({"ffnskip_threshold": True}, "ffnskip_threshold"),
        ({"ffnskip_warmup": 1.5}, "ffnskip_warmup"),
        ({"ffnskip_warmup": 10**30}, "ffnskip_warmup"),
        ({"ffnskip_cold_end": {"a": 1}}, "ffnskip_cold_end"),
        ({"ffnskip": "yes"}, "ffnskip"),
        ({"ffnskip_foo": 1}, "ffnskip_foo"),
        ({"ffnskip_resolved": {}}, "ffnskip_resolved"),
    ],
)
def test_invalid_request_values_name_the_field(extra, field):
    with pytest.raises(PolicyError) as err:
        parse_request(extra, DEFAULT, LAYERS)
    assert err.value.field == field


def test_cold_regions_covering_every_layer_are_rejected():
    with pytest.raises(PolicyError) as err:
        parse_request({"ffnskip_cold_start": 15, "ffnskip_cold_end": 15}, DEFAULT, LAYERS)
    assert err.value.field == "ffnskip_cold_start"
    with pytest.raises(PolicyError) as err:
        parse_request({"ffnskip_cold_end": 28}, DEFAULT, LAYERS)
    assert err.value.field == "ffnskip_cold_end"


@pytest.mark.parametrize(
    "config, field",
    [
        ({"threshold": 2}, "ffnskip.threshold"),
        ({"bogus": 1}, "ffnskip.bogus"),
        ({"policy_file": "/nonexistent/policy.json"}, "policy_file"),
        ([], "ffnskip"),
        ({"max_skip_rows": -1}, "ffnskip.max_skip_rows"),
        ({"max_skip_rows": True}, "ffnskip.max_skip_rows"),
        ({"wide_skip_rows": -1}, "ffnskip.wide_skip_rows"),
        ({"wide_skip_rows": 1.5}, "ffnskip.wide_skip_rows"),
    ],
)
def test_invalid_server_config(config, field):
    with pytest.raises(PolicyError) as err:
        parse_server_config(config)
    assert err.value.field == field


def test_pass_keys_shape_passes_not_the_policy():
    from vllm_ffnskip.policy import (
        DEFAULT_MAX_SKIP_ROWS, DEFAULT_WIDE_SKIP_ROWS, max_skip_rows, wide_skip_rows)

    config = {"max_skip_rows": 0, "wide_skip_rows": 4}
    assert parse_server_config(config) == parse_server_config({})
    assert max_skip_rows(config) == 0 and max_skip_rows({"threshold": 0.9}) == 2
    assert wide_skip_rows(config) == 4 and wide_skip_rows({"threshold": 0.9}) == 0
    assert max_skip_rows(None) == DEFAULT_MAX_SKIP_ROWS
    assert wide_skip_rows(None) == DEFAULT_WIDE_SKIP_ROWS


def test_malformed_policy_file_names_path_and_reason(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"layer_thresholds": [0.9, "x"]}')
    with pytest.raises(PolicyError) as err:
        load_policy_file(path)
    assert str(path) in str(err.value) and "layer_thresholds[1]" in str(err.value)


values = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(allow_nan=True),
    st.text(max_size=5), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


# The machine may be busy with engines of other tests: no timing health checks.
@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None, max_examples=300)
@given(st.dictionaries(st.sampled_from(sorted(REQUEST_KEYS) + ["ffnskip_x"]), values, max_size=4))
def test_any_request_is_valid_or_rejected_naming_a_sent_key(extra):
    """Property: parsing never crashes; it returns a policy whose every field is in range,
    or a PolicyError naming one of the keys that was sent."""
    try:
        policy = parse_request(extra, DEFAULT, LAYERS)
    except PolicyError as e:
        assert e.field in extra
        return
    assert 0 < policy.threshold <= 1 and not math.isnan(policy.threshold)
    assert policy.warmup >= 0 and policy.span >= 1
    assert policy.cold_start + policy.cold_end < LAYERS
    assert len(policy.to_wire(LAYERS)["thresholds"]) == LAYERS
