"""Render the Helm chart with the real helm binary and check the parsed objects."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import jsonschema
import pytest

from . import k8s
from .conftest import CHART, REPO

MULTI_NODE = {"multiNode": {"enabled": True, "size": 2}, "tensorParallelSize": 4, "pipelineParallelSize": 2}
# What the defaults render: only `enabled`; every other key is left to the plugin (or a policy file).
DEFAULT_FFNSKIP = {"enabled": True}
# The plugin's documented built-in defaults (docs/deploy.md, vllm_ffnskip/policy.py SkipPolicy).
PLUGIN_DEFAULTS = {"enabled": True, "threshold": 0.99, "warmup": 2, "cold_start": 2, "cold_end": 2, "span": 1}
POLICY_MOUNT = "/etc/vllm-ffnskip/policies"
# A calibrated policy file whose values all differ from the plugin's defaults.
POLICY_FILE = {"layer_thresholds": [1.0, 1.0, 0.91, 0.95, 0.97, 1.0], "warmup": 4, "cold_start": 1,
               "cold_end": 1, "span": 2}
WITH_POLICY_FILE = {"policyFiles": {"calibrated.json": POLICY_FILE},
                    "ffnskip": {"policy_file": f"{POLICY_MOUNT}/calibrated.json"}}
CUSTOM_FFNSKIP = {"enabled": False, "threshold": 0.97, "warmup": 4, "cold_start": 3, "cold_end": 1,
                  "span": 2, "policy_file": "/etc/vllm-ffnskip/policies/llama.json"}

CASES: dict[str, dict | None] = {
    "defaults": None,
    "tp4": {"tensorParallelSize": 4},
    "tp2-pp2": {"tensorParallelSize": 2, "pipelineParallelSize": 2},
    "multi-node": MULTI_NODE,
    "api-key": {"apiKeySecret": "ffnskip-api-key", "hfTokenSecret": "hf-token"},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}},
    "pvc": {"modelCache": {"type": "persistentVolumeClaim", "storageClassName": "fast-ssd"}},
    "everything": {
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "servedModelName": "llama",
        "ffnskip": CUSTOM_FFNSKIP,
        "policyFiles": {"llama.json": {"layer_thresholds": [0.97, 0.98]}},
        "extraArgs": ["--max-model-len", 4096, "--enforce-eager"],
        "extraEnv": [{"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}],
        "extraVolumes": [{"name": "scratch", "emptyDir": {}}],
        "extraVolumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
        "imagePullSecrets": [{"name": "regcred"}],
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}},
        "runtimeClassName": "nvidia",
        "priorityClassName": "high",
        "serviceAccount": {"create": True},
        "podSecurityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000, "runAsNonRoot": True},
        "modelCache": {"type": "persistentVolumeClaim", "existingClaim": "shared-models"},
        "service": {"type": "LoadBalancer", "annotations": {"example.com/lb": "internal"}},
        "apiKeySecret": "ffnskip-api-key",
        "serviceMonitor": {"enabled": True},
    },
    "multi-node-full": {**MULTI_NODE, "apiKeySecret": "ffnskip-api-key", "serviceMonitor": {"enabled": True},
                        "modelCache": {"type": "persistentVolumeClaim", "accessModes": ["ReadWriteMany"]},
                        "policyFiles": {"p.json": "{}"}, "replicaCount": 2},
}


@pytest.fixture(params=sorted(CASES), ids=sorted(CASES))
def case(request):
    return request.param, CASES[request.param]


def test_helm_lint(helm_cmd):
    for values in (None, MULTI_NODE, CASES["everything"]):
        proc = helm_cmd("lint", "--strict", str(CHART), values=values)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rendered_objects_validate(render, case):
    name, values = case
    docs = render(values)
    kinds = {d["kind"] for d in docs}
    assert "Service" in kinds
    assert ("LeaderWorkerSet" in kinds) != ("Deployment" in kinds)
    for doc in docs:
        k8s.validate(doc)


def test_strict_validation_rejects_unknown_fields(render):
    """Negative control: the validators used above do reject a misplaced field."""
    deployment = k8s.one(render(), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    with pytest.raises(jsonschema.ValidationError):
        k8s.validate(deployment)
    lws = k8s.one(render(MULTI_NODE), "LeaderWorkerSet")
    lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["enableServiceLink"] = False
    with pytest.raises(jsonschema.ValidationError):
        k8s.validate(lws)


def test_every_pod_spec_disables_service_links(render, case):
    for role, template in k8s.all_pod_templates(render(case[1])):
        assert template["spec"]["enableServiceLinks"] is False, role


def test_dev_shm_is_memory_backed(render, case):
    for role, template in k8s.all_pod_templates(render(case[1])):
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            shm = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            assert len(shm) == 1, role
            assert volumes[shm[0]["name"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}


def test_runtime_class_only_when_set(render):
    for name, values in CASES.items():
        for role, template in k8s.all_pod_templates(render(values)):
            expected = (values or {}).get("runtimeClassName")
            assert template["spec"].get("runtimeClassName") == expected, (name, role)


def _serve_args(docs):
    container = k8s.serving_template(docs)["spec"]["containers"][0]
    args = k8s.argv(container)
    return args[args.index("serve") - 1:]


@pytest.mark.parametrize("ffnskip", [None, CUSTOM_FFNSKIP], ids=["default-policy", "custom-policy"])
@pytest.mark.parametrize("multi", [False, True], ids=["single-node", "multi-node"])
def test_serve_args(render, ffnskip, multi):
    values = {**(MULTI_NODE if multi else {}), **({"ffnskip": ffnskip} if ffnskip else {})}
    args = _serve_args(render(values))
    assert args[:3] == ["vllm", "serve", "HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert k8s.flag_value(args, "--model-impl") == "ffnskip"
    expected_policy = ffnskip or DEFAULT_FFNSKIP
    assert json.loads(k8s.flag_value(args, "--additional-config")) == {"ffnskip": expected_policy}
    assert k8s.flag_value(args, "--tensor-parallel-size") == ("4" if multi else "1")
    assert k8s.flag_value(args, "--pipeline-parallel-size") == ("2" if multi else "1")
    assert ("--distributed-executor-backend" in args) == multi
    assert k8s.flag_value(args, "--port") == "8000"


def _additional_config(docs) -> dict:
    config = json.loads(k8s.flag_value(_serve_args(docs), "--additional-config"))
    assert list(config) == ["ffnskip"]
    return config["ffnskip"]


@pytest.fixture(scope="module")
def policy():
    """vllm_ffnskip/policy.py, the plugin's own parser (loaded by path: it imports nothing of
    vLLM, and the package's __init__ is not needed)."""
    path = REPO / "vllm_ffnskip" / "policy.py"
    if not path.is_file():
        pytest.skip("vllm_ffnskip/policy.py not present")
    spec = importlib.util.spec_from_file_location("_ffnskip_policy_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _parse_as_in_pod(policy, config: dict, docs, tmp_path):
    """parse_server_config as the pod would run it: the policyFiles ConfigMap's data written to a
    folder that stands in for its mount, and policy_file pointed there."""
    config = dict(config)
    if "policy_file" in config:
        (configmap,) = k8s.of_kind(docs, "ConfigMap")
        for name, content in configmap["data"].items():
            (tmp_path / name).write_text(content)
        assert config["policy_file"].startswith(POLICY_MOUNT + "/")
        config["policy_file"] = str(tmp_path / config["policy_file"][len(POLICY_MOUNT) + 1:])
    return policy.parse_server_config(config)


def test_null_policy_keys_are_left_out(render):
    """A key given as null is not rendered (Helm unsets it), even one the chart sets (enabled);
    the plugin then applies its own default, or the policy file's value."""
    values = {"ffnskip": {"enabled": None, "threshold": None, "warmup": None, "policy_file": "/policies/p.json"}}
    assert _additional_config(render(values)) == {"policy_file": "/policies/p.json"}


@pytest.mark.parametrize("multi", [False, True], ids=["single-node", "multi-node"])
def test_policy_file_thresholds_not_overridden_by_default(render, policy, tmp_path, multi):
    """The issue: a default threshold (and warmup/cold/span) must not replace a policy file's."""
    docs = render({**(MULTI_NODE if multi else {}), **WITH_POLICY_FILE})
    config = _additional_config(docs)
    assert "threshold" not in config
    assert config == {"enabled": True, "policy_file": f"{POLICY_MOUNT}/calibrated.json"}
    parsed = _parse_as_in_pod(policy, config, docs, tmp_path)
    assert parsed.layer_thresholds == tuple(POLICY_FILE["layer_thresholds"])
    assert parsed.thresholds(6) == POLICY_FILE["layer_thresholds"]
    for key in ("warmup", "cold_start", "cold_end", "span"):
        assert getattr(parsed, key) == POLICY_FILE[key] != PLUGIN_DEFAULTS[key], key
    assert parsed.enabled is True


@pytest.mark.parametrize("threshold", [0.97, 1])
def test_explicit_threshold_is_rendered(render, policy, tmp_path, threshold):
    config = _additional_config(render({"ffnskip": {"threshold": threshold}}))
    assert config == {"enabled": True, "threshold": threshold}
    assert policy.parse_server_config(config).threshold == threshold
    # Beside a policy file, a threshold the user set is rendered and replaces the per-layer ones;
    # the keys they did not set still come from the file.
    values = {**WITH_POLICY_FILE, "ffnskip": {**WITH_POLICY_FILE["ffnskip"], "threshold": threshold}}
    docs = render(values)
    config = _additional_config(docs)
    assert config == {"enabled": True, "threshold": threshold, "policy_file": f"{POLICY_MOUNT}/calibrated.json"}
    parsed = _parse_as_in_pod(policy, config, docs, tmp_path)
    assert parsed.layer_thresholds is None and parsed.thresholds(6) == [threshold] * 6
    assert parsed.warmup == POLICY_FILE["warmup"] and parsed.span == POLICY_FILE["span"]


@pytest.mark.parametrize("key,value", [("enabled", False), ("warmup", 0), ("cold_start", 3),
                                       ("cold_end", 0), ("span", 2), ("policy_file", "/p.json"),
                                       ("max_skip_rows", 0), ("wide_skip_rows", 0)])
def test_only_keys_set_are_rendered(render, key, value):
    assert _additional_config(render({"ffnskip": {key: value}})) == {**DEFAULT_FFNSKIP, key: value}


def test_default_policy_accepted_by_plugin_parser(render, policy):
    """Contract with vllm_ffnskip/policy.py: the defaults give the documented default policy,
    and leave a base policy (the embedded model's calibrated one, default_policy_for) intact."""
    config = _additional_config(render())
    parsed = policy.parse_server_config(config)
    assert parsed == policy.SkipPolicy()
    assert {key: getattr(parsed, key) for key in PLUGIN_DEFAULTS} == PLUGIN_DEFAULTS
    assert parsed.layer_thresholds is None and parsed.thresholds(4) == [0.99] * 4
    base = policy.SkipPolicy(threshold=0.9, warmup=5, cold_start=1, cold_end=3, span=2,
                             layer_thresholds=(1.0, 0.9, 0.95, 1.0, 0.9, 1.0, 1.0))
    assert policy.parse_server_config(config, base=base) == base
    # A fully custom server policy parses to exactly the values given.
    custom = {**CUSTOM_FFNSKIP, "policy_file": None}
    parsed = policy.parse_server_config(_additional_config(render({"ffnskip": custom})))
    assert {key: getattr(parsed, key) for key in PLUGIN_DEFAULTS} == {k: custom[k] for k in PLUGIN_DEFAULTS}


def _install_notes(helm_cmd, values) -> str:
    proc = helm_cmd("install", "--dry-run=client", "ffnskip", str(CHART), values=values)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("NOTES:", 1)[1]


def test_notes_warn_only_about_overrides_the_user_set(helm_cmd):
    assert "NOTE:" not in _install_notes(helm_cmd, WITH_POLICY_FILE)
    assert "NOTE:" not in _install_notes(helm_cmd, {"ffnskip": {"threshold": 0.97}})  # no policy file
    values = {**WITH_POLICY_FILE, "ffnskip": {**WITH_POLICY_FILE["ffnskip"], "threshold": 0.97, "span": 1}}
    notes = _install_notes(helm_cmd, values)
    assert "NOTE:" in notes and "ffnskip.threshold (replacing its per-layer thresholds)" in notes
    assert "ffnskip.span" in notes and "ffnskip.warmup" not in notes


def test_extra_args_and_served_name(render):
    docs = render(CASES["everything"])
    args = _serve_args(docs)
    assert args[2] == "meta-llama/Llama-3.1-8B-Instruct"
    assert k8s.flag_value(args, "--served-model-name") == "llama"
    assert args[-3:] == ["--max-model-len", "4096", "--enforce-eager"]
    container = k8s.serving_template(docs)["spec"]["containers"][0]
    assert k8s.env_by_name(container)["VLLM_LOGGING_LEVEL"]["value"] == "DEBUG"


@pytest.mark.parametrize("tp,pp", [(1, 1), (4, 1), (2, 2), (8, 2)])
def test_gpu_limit_single_node(render, tp, pp):
    docs = render({"tensorParallelSize": tp, "pipelineParallelSize": pp})
    (container,) = k8s.one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert k8s.gpu_limit(container) == tp * pp
    assert container["resources"]["limits"]["memory"] == "32Gi"  # values' other limits kept


def test_gpu_limit_multi_node_is_tp_per_pod(render):
    docs = render({"multiNode": {"enabled": True, "size": 3}, "tensorParallelSize": 8, "pipelineParallelSize": 3})
    lws = k8s.one(docs, "LeaderWorkerSet")
    assert lws["spec"]["leaderWorkerTemplate"]["size"] == 3
    for role, template in k8s.pod_templates(lws):
        (container,) = template["spec"]["containers"]
        assert k8s.gpu_limit(container) == 8, role


def test_probes(render, case):
    (container,) = k8s.serving_template(render(case[1]))["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    startup, liveness = container["startupProbe"], container["livenessProbe"]
    budget = lambda p: p["periodSeconds"] * p["failureThreshold"]  # noqa: E731
    # Liveness only starts once the startup probe succeeded; loading may take many minutes.
    assert budget(startup) >= 20 * 60
    assert budget(startup) > 10 * budget(liveness)
    assert "initialDelaySeconds" not in liveness


def test_api_key_from_secret_only(render, case):
    name, values = case
    docs = render(values)
    assert not k8s.of_kind(docs, "Secret"), "the chart must not carry secret values"
    secret = (values or {}).get("apiKeySecret")
    for role, template in k8s.all_pod_templates(docs):
        for container in template["spec"]["containers"]:
            assert not any(a.startswith("--api-key") for a in k8s.argv(container)), role
            env = k8s.env_by_name(container)
            if secret is None:
                assert "VLLM_API_KEY" not in env
                continue
            assert env["VLLM_API_KEY"] == {"name": "VLLM_API_KEY", "valueFrom": {
                "secretKeyRef": {"name": secret, "key": "api-key"}}}, role


def test_hf_token_and_cache(render):
    docs = render(CASES["api-key"])
    for role, template in k8s.all_pod_templates(docs):
        (container,) = template["spec"]["containers"]
        env = k8s.env_by_name(container)
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert env["HF_HOME"]["value"] == mounts["model-cache"] == "/cache/huggingface"
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["model-cache"]["emptyDir"] == {"sizeLimit": "50Gi"}
    assert "HF_TOKEN" not in k8s.env_by_name(k8s.serving_template(render())["spec"]["containers"][0])


def test_model_cache_pvc(render):
    docs = render(CASES["pvc"])
    pvc = k8s.one(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["storageClassName"] == "fast-ssd"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "50Gi"
    volumes = {v["name"]: v for v in k8s.serving_template(docs)["spec"]["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"] == {"claimName": pvc["metadata"]["name"]}
    docs = render(CASES["everything"])  # existingClaim: used, not created
    assert not k8s.of_kind(docs, "PersistentVolumeClaim")
    volumes = {v["name"]: v for v in k8s.serving_template(docs)["spec"]["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"] == {"claimName": "shared-models"}


def test_release_named_vllm_gives_no_service_named_vllm(render, helm_cmd):
    for values in (None, MULTI_NODE):
        docs = render(values, release="vllm")
        names = {d["metadata"]["name"] for d in docs}
        assert "vllm" not in names
        assert k8s.one(docs, "Service")["metadata"]["name"].upper().replace("-", "_") != "VLLM"
    proc = helm_cmd("template", "x", str(CHART), "--set", "fullnameOverride=vllm")
    assert proc.returncode != 0 and "VLLM_PORT" in proc.stderr


def test_multi_node(render):
    docs = render(MULTI_NODE)
    assert not k8s.of_kind(docs, "Deployment")
    lws = k8s.one(docs, "LeaderWorkerSet")
    templates = dict(k8s.pod_templates(lws))
    (leader,) = templates["leader"]["spec"]["containers"]
    (worker,) = templates["worker"]["spec"]["containers"]
    assert leader["image"] == worker["image"] == "vllm-ffnskip:0.1.0"
    leader_argv = k8s.argv(leader)
    assert k8s.flag_value(leader_argv, "--distributed-executor-backend") == "ray"
    assert "ray start --head --port=6379" in leader["command"][2]
    assert leader["command"][2].rstrip().endswith('exec "$@"')
    assert worker["args"] == ["ray", "start", "--address=$(LWS_LEADER_ADDRESS):6379", "--block"]
    assert "startupProbe" not in worker and "ports" not in worker
    # Both run with the same env/mounts (HF cache, token, extra env) as the serving pod.
    assert worker["env"] == leader["env"] and worker["volumeMounts"] == leader["volumeMounts"]
    service = k8s.one(docs, "Service")
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "leader"
    assert templates["leader"]["metadata"]["labels"].items() >= service["spec"]["selector"].items()
    assert not templates["worker"]["metadata"]["labels"].items() >= service["spec"]["selector"].items()


@pytest.mark.parametrize("values,message", [
    ({"multiNode": {"enabled": True, "size": 2}, "pipelineParallelSize": 1}, "must equal pipelineParallelSize"),
    ({**MULTI_NODE, "modelCache": {"type": "persistentVolumeClaim"}}, "ReadWriteMany"),
])
def test_multi_node_misconfiguration_fails(helm_cmd, values, message):
    proc = helm_cmd("template", "x", str(CHART), values=values)
    assert proc.returncode != 0 and message in proc.stderr


def test_service_selects_serving_pods(render, case):
    docs = render(case[1])
    service = k8s.one(docs, "Service")
    assert service["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    serving = k8s.serving_template(docs)
    assert serving["metadata"]["labels"].items() >= service["spec"]["selector"].items()


@pytest.mark.parametrize("multi", [False, True], ids=["single-node", "multi-node"])
def test_metrics(render, multi):
    values = {**(MULTI_NODE if multi else {}), "serviceMonitor": {"enabled": True, "labels": {"release": "kps"}}}
    docs = render(values)
    annotations = k8s.serving_template(docs)["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8000"
    assert annotations["prometheus.io/path"] == "/metrics"
    service = k8s.one(docs, "Service")
    monitor = k8s.one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert service["metadata"]["labels"].items() >= monitor["spec"]["selector"]["matchLabels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["llm"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    if multi:  # workers serve no HTTP: not scraped
        worker = dict(k8s.all_pod_templates(docs))["worker"]
        assert "prometheus.io/scrape" not in worker["metadata"].get("annotations", {})


def test_metrics_off(render):
    docs = render({"metrics": {"enabled": False}})
    assert not k8s.of_kind(docs, "ServiceMonitor")
    assert "prometheus.io/scrape" not in k8s.serving_template(docs)["metadata"].get("annotations", {})


def test_policy_files_mounted_and_roll_pods(render):
    docs = render(CASES["everything"])
    configmap = k8s.one(docs, "ConfigMap")
    assert json.loads(configmap["data"]["llama.json"]) == {"layer_thresholds": [0.97, 0.98]}
    template = k8s.serving_template(docs)
    (container,) = template["spec"]["containers"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "policy-files")
    assert mount == {"name": "policy-files", "mountPath": "/etc/vllm-ffnskip/policies", "readOnly": True}
    assert CUSTOM_FFNSKIP["policy_file"].startswith(mount["mountPath"] + "/")
    checksum = template["metadata"]["annotations"]["checksum/policy-files"]
    changed = {**CASES["everything"], "policyFiles": {"llama.json": {"layer_thresholds": [0.96, 0.98]}}}
    assert k8s.serving_template(render(changed))["metadata"]["annotations"]["checksum/policy-files"] != checksum


def test_pod_placement_and_security(render):
    values = CASES["everything"]
    template = k8s.serving_template(render(values))
    spec = template["spec"]
    assert spec["nodeSelector"] == values["nodeSelector"]
    assert spec["tolerations"] == values["tolerations"]
    assert spec["affinity"] == values["affinity"]
    # Helm merges maps with the defaults: the default seccomp profile stays.
    assert spec["securityContext"] == {**values["podSecurityContext"], "seccompProfile": {"type": "RuntimeDefault"}}
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["serviceAccountName"] == "ffnskip-vllm-ffnskip"
    (container,) = spec["containers"]
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    default = k8s.serving_template(render())["spec"]
    assert default["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in default


def test_multi_node_scripts_are_valid_bash(render):
    lws = k8s.one(render(MULTI_NODE), "LeaderWorkerSet")
    for role, template in k8s.pod_templates(lws):
        (container,) = template["spec"]["containers"]
        shell, flag, script, name = container["command"]
        assert (shell, flag) == ("/bin/bash", "-c")
        assert "$$" not in script  # Kubernetes would turn $$ into $
        proc = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
        assert proc.returncode == 0, (role, proc.stderr)
