"""values.schema.json: wrong types and out-of-range values fail `helm template`, naming the field."""

from __future__ import annotations

import pytest

from .conftest import CHART


@pytest.mark.parametrize("args,field", [
    (["--set", "tensorParallelSize=four"], "/tensorParallelSize"),
    (["--set-string", "tensorParallelSize=4"], "/tensorParallelSize"),
    (["--set", "tensorParallelSize=0"], "/tensorParallelSize"),
    (["--set", "pipelineParallelSize=1.5"], "/pipelineParallelSize"),
    (["--set", "ffnskip.threshold=high"], "/ffnskip/threshold"),
    (["--set-json", "ffnskip.threshold=1.5"], "/ffnskip/threshold"),
    (["--set-json", "ffnskip.threshold=0"], "/ffnskip/threshold"),
    # --set leaves decimals as strings: use --set-json (or a values file) for the threshold.
    (["--set", "ffnskip.threshold=0.97"], "/ffnskip/threshold"),
    (["--set", "ffnskip.enabled=maybe"], "/ffnskip/enabled"),
    (["--set", "ffnskip.warmup=-1"], "/ffnskip/warmup"),
    (["--set", "ffnskip.span=0"], "/ffnskip/span"),
    (["--set", "ffnskip.policy_file=3"], "/ffnskip/policy_file"),
    (["--set-string", "ffnskip.warmup=2"], "/ffnskip/warmup"),
    (["--set", "ffnskip.cold_end=-1"], "/ffnskip/cold_end"),
    (["--set-json", "ffnskip.cold_start=1.5"], "/ffnskip/cold_start"),
    (["--set", "ffnskip.treshold=0.9"], "treshold"),
    (["--set", "multiNode.enabled=yes"], "/multiNode/enabled"),
    (["--set-string", "multiNode.enabled=true"], "/multiNode/enabled"),
    (["--set", "multiNode.size=two"], "/multiNode/size"),
    (["--set", "apiKeySecret=true"], "/apiKeySecret"),
    (["--set", "modelCache.type=hostPath"], "/modelCache/type"),
    (["--set", "shmSize=lots"], "/shmSize"),
    (["--set", "tensorParalelSize=4"], "tensorParalelSize"),
])
def test_schema_rejects(helm_cmd, args, field):
    proc = helm_cmd("template", "x", str(CHART), *args)
    assert proc.returncode != 0, f"{args} was accepted"
    assert "schema" in proc.stderr and field in proc.stderr, proc.stderr


@pytest.mark.parametrize("args", [
    ["--set-json", "ffnskip.threshold=0.97"],
    ["--set", "ffnskip.threshold=1"],
    ["--set", "ffnskip.enabled=false,ffnskip.warmup=0,ffnskip.cold_start=0,ffnskip.cold_end=0"],
    ["--set", "ffnskip.policy_file=/etc/vllm-ffnskip/policies/p.json"],
    # Every ffnskip key is optional: null (the chart's default for most) leaves it out.
    ["--set-json", "ffnskip.threshold=null"],
    ["--set", "ffnskip.enabled=null,ffnskip.warmup=null,ffnskip.span=null"],
    ["--set-json", 'ffnskip={"threshold": 0.95}'],
    ["--set", "tensorParallelSize=8,pipelineParallelSize=2"],
    ["--set", "multiNode.enabled=true,multiNode.size=2,pipelineParallelSize=2"],
])
def test_schema_accepts(helm_cmd, args):
    proc = helm_cmd("template", "x", str(CHART), *args)
    assert proc.returncode == 0, proc.stderr
