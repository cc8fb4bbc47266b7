"""Queries on rendered chart objects, and their validation against Kubernetes schemas.

Validation policy (kubernetes-validate only knows built-in kinds):
- built-in kinds (Deployment, Service, PVC, ConfigMap, ServiceAccount): validated whole, strict
  (unknown fields rejected), against KUBE_VERSION;
- LeaderWorkerSet (CRD): its leaderTemplate and workerTemplate are wrapped as core/v1 PodTemplate
  objects and validated strict, plus structural checks of the LWS fields we set;
- ServiceMonitor (CRD): structural checks of the fields we set (no pod inside).
An unknown kind fails, so a new template cannot slip through unvalidated.
"""

from __future__ import annotations

from typing import Any, Iterator

import kubernetes_validate

# Kubernetes minor version to validate against: a current release that the installed
# kubernetes-validate ships schemas for (it ships 1.25 ... its own version).
KUBE_VERSION = "1.35"

BUILTIN_KINDS = {"Deployment", "Service", "PersistentVolumeClaim", "ConfigMap", "ServiceAccount"}
LWS_API = "leaderworkerset.x-k8s.io/v1"
SERVICEMONITOR_API = "monitoring.coreos.com/v1"

Obj = dict[str, Any]


def of_kind(docs: list[Obj], kind: str) -> list[Obj]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[Obj], kind: str) -> Obj:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def pod_templates(doc: Obj) -> Iterator[tuple[str, Obj]]:
    """(role, PodTemplateSpec) of every pod template inside an object."""
    if doc["kind"] == "Deployment":
        yield "server", doc["spec"]["template"]
    elif doc["kind"] == "LeaderWorkerSet":
        lwt = doc["spec"]["leaderWorkerTemplate"]
        yield "leader", lwt["leaderTemplate"]
        yield "worker", lwt["workerTemplate"]


def all_pod_templates(docs: list[Obj]) -> list[tuple[str, Obj]]:
    return [pt for d in docs for pt in pod_templates(d)]


def serving_template(docs: list[Obj]) -> Obj:
    """The pod template that runs `vllm serve` (Deployment pod or LWS leader)."""
    templates = dict(all_pod_templates(docs))
    return templates.get("server") or templates["leader"]


def argv(container: Obj) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def flag_value(args: list[str], flag: str) -> str:
    assert args.count(flag) == 1, f"{flag} appears {args.count(flag)} times in {args}"
    return args[args.index(flag) + 1]


def env_by_name(container: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in container.get("env", [])}


def gpu_limit(container: Obj, resource: str = "nvidia.com/gpu") -> int:
    return int(container["resources"]["limits"][resource])


def validate(doc: Obj) -> None:
    """Validate one rendered object according to the policy in the module docstring."""
    kind = doc["kind"]
    if kind in BUILTIN_KINDS:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    elif kind == "LeaderWorkerSet":
        _validate_lws(doc)
    elif kind == "ServiceMonitor":
        _validate_service_monitor(doc)
    else:
        raise AssertionError(f"no validation rule for kind {kind}: add one to tests/deploy/k8s.py")


def _validate_lws(doc: Obj) -> None:
    assert doc["apiVersion"] == LWS_API
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    spec = doc["spec"]
    assert set(spec) <= {"replicas", "startupPolicy", "leaderWorkerTemplate", "rolloutStrategy",
                         "networkConfig"}
    assert isinstance(spec["replicas"], int) and spec["replicas"] >= 0
    assert spec["startupPolicy"] in {"LeaderCreated", "LeaderReady"}
    lwt = spec["leaderWorkerTemplate"]
    assert set(lwt) <= {"size", "restartPolicy", "leaderTemplate", "workerTemplate",
                        "subGroupPolicy", "volumeClaimTemplates"}
    assert isinstance(lwt["size"], int) and lwt["size"] >= 1
    assert lwt["restartPolicy"] in {"RecreateGroupOnPodRestart", "None"}
    for role, template in pod_templates(doc):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate",
                   "metadata": {"name": f"{doc['metadata']['name']}-{role}"}, "template": template}
        kubernetes_validate.validate(wrapped, KUBE_VERSION, strict=True)


def _validate_service_monitor(doc: Obj) -> None:
    assert doc["apiVersion"] == SERVICEMONITOR_API
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    spec = doc["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}
    assert set(spec["selector"]) == {"matchLabels"}
    assert all(isinstance(v, str) for v in spec["selector"]["matchLabels"].values())
    assert spec["endpoints"], "a ServiceMonitor needs endpoints"
    for ep in spec["endpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        assert isinstance(ep["port"], str)
