"""The rendered server argv is accepted by the installed vLLM's own `vllm serve` parser."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from . import k8s
from .test_chart import MULTI_NODE, POLICY_MOUNT, WITH_POLICY_FILE

PARSE = r"""
import json, sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.entrypoints.cli.serve import ServeSubcommand
parser = FlexibleArgumentParser()
ServeSubcommand().subparser_init(parser.add_subparsers(dest="subcommand"))
out = []
for argv in json.load(sys.stdin):
    a = parser.parse_args(argv)
    out.append({k: getattr(a, k) for k in ("subcommand", "model_tag", "model_impl", "additional_config",
            "tensor_parallel_size", "pipeline_parallel_size", "distributed_executor_backend", "port",
            "max_model_len")})
print("RESULT" + json.dumps(out))
"""


def test_serve_argv_parses_with_vllm(render):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    values = {"extraArgs": ["--max-model-len", 2048]}
    argvs = []
    explicit = {**values, **WITH_POLICY_FILE,
                "ffnskip": {**WITH_POLICY_FILE["ffnskip"], "threshold": 0.97}}
    for docs in (render(values), render({**MULTI_NODE, **values}), render(explicit)):
        argv = k8s.argv(k8s.serving_template(docs)["spec"]["containers"][0])
        argvs.append(argv[argv.index("vllm") + 1:])  # what follows the `vllm` executable
    proc = subprocess.run([sys.executable, "-c", PARSE], input=json.dumps(argvs),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, multi, explicit = json.loads(proc.stdout.split("RESULT", 1)[1])
    for parsed in (single, multi, explicit):
        assert parsed["subcommand"] == "serve"
        assert parsed["model_tag"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert parsed["model_impl"] == "ffnskip"
        assert parsed["port"] == 8000 and parsed["max_model_len"] == 2048
    for parsed in (single, multi):
        # No threshold (nor warmup/cold/span): the plugin's defaults or a policy file's apply.
        assert parsed["additional_config"] == {"ffnskip": {"enabled": True}}
    # A threshold the user sets reaches vLLM as a number, next to the policy file.
    assert explicit["additional_config"] == {"ffnskip": {
        "enabled": True, "threshold": 0.97, "policy_file": f"{POLICY_MOUNT}/calibrated.json"}}
    assert (single["tensor_parallel_size"], single["pipeline_parallel_size"]) == (1, 1)
    assert (multi["tensor_parallel_size"], multi["pipeline_parallel_size"]) == (4, 2)
    assert multi["distributed_executor_backend"] == "ray"
