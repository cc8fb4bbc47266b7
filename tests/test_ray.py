"""The plugin inside a vLLM worker started the way vLLM's Ray executor starts it.

vLLM 0.32 refuses the Ray executor on the CPU platform (``initialize_ray_cluster``: "current
platform cpu does not support ray.", because ``CpuPlatform.ray_device_key`` is empty), so an
engine with ``--distributed-executor-backend ray`` cannot run here. What multi-node serving
needs from this plugin can be tested all the same: a fresh Ray worker process that vLLM
initialises (``RayWorkerWrapper`` actor, ``init_worker`` with the driver's ``VllmConfig``)
must run our ``register()`` through ``load_general_plugins()``, apply the patches, resolve
the model to ``FFNSkipLlamaForCausalLM``, load it, and carry the ``ffnskip_stats``
extension that ``collective_rpc`` calls.

The Ray cluster is local, bound to the loopback address, one CPU, no dashboard, and is shut
down at the end of the module.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (pip install ray)")

from tests.tiny_llama import build

#: Bound on every Ray call (worker start, init, model load); the whole module takes ~1 min.
TIMEOUT_S = 240
HERE = Path(__file__).resolve().parent
#: Where a Ray worker finds this module (pytest imports it as ``test_ray`` or
#: ``tests.test_ray``) when a check function below arrives by reference.
PYTHONPATH = os.pathsep.join([str(HERE.parent), str(HERE)])


def _ray_listeners() -> set[str] | None:
    """Addresses that this process's Ray children listen on (None: cannot be read here)."""
    import psutil

    pids = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
    try:
        conns = psutil.net_connections(kind="inet")
    except psutil.AccessDenied:
        return None
    return {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN and c.pid in pids}


def _is_loopback(ip: str) -> bool:
    import ipaddress

    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return address.is_loopback or bool(mapped and mapped.is_loopback)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A local single-node Ray cluster on the loopback interface only.

    Ray >= 2.x replaces a ``_node_ip_address`` of 127.0.0.1 by the host's routable address
    and its servers then listen on every interface; with Ray's own single-machine switch
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read at import, hence also set on the
    imported constant) the node address stays 127.0.0.1 and so do the listeners.
    """
    if ray.is_initialized():
        pytest.skip("a Ray cluster is already connected in this process")
    from ray._private import ray_constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # inherited by Ray's processes
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        ray.init(
            address="local",
            num_cpus=1,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            object_store_memory=100 * 1024**2,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": PYTHONPATH}},
        )
        try:
            assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
            listeners = _ray_listeners()
            assert listeners is None or (listeners and all(map(_is_loopback, listeners))), listeners
            yield
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def vllm_config(ray_cluster):
    """The driver's config for an ffnskip engine, as ``vllm serve`` would build it."""
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(
        model=build(),
        model_impl="ffnskip",
        skip_tokenizer_init=True,
        dtype="float32",
        max_model_len=256,
        enforce_eager=True,
        additional_config={"ffnskip": {"threshold": 0.985}},
    )
    return args.create_engine_config()


def _worker_state(wrapper: Any) -> dict[str, Any]:
    """Runs inside the Ray actor (``RayWorkerWrapper.execute_method``)."""
    import sys

    state: dict[str, Any] = {"pid": os.getpid()}
    patches = sys.modules.get("vllm_ffnskip.patches")
    state["patches_applied"] = bool(patches is not None and patches._applied)
    from vllm.model_executor.models.registry import _ModelRegistry

    state["resolve_patched"] = bool(
        getattr(_ModelRegistry.resolve_model_cls, "__ffnskip_patch__", False)
    )
    worker = getattr(wrapper, "__dict__", {}).get("worker")
    if worker is not None:
        from vllm.model_executor.model_loader.utils import get_model_cls

        cls = get_model_cls(wrapper.vllm_config.model_config)
        state["model_cls"] = f"{cls.__module__}.{cls.__qualname__}"
        state["worker_cls"] = type(worker).__name__
        state["has_ffnskip_stats"] = callable(getattr(worker, "ffnskip_stats", None))
    return state


def _load_and_inspect(wrapper: Any) -> dict[str, Any]:
    """Runs inside the Ray actor: the worker's own device init and model load, then what
    the skip-aware pieces look like in the loaded model."""
    wrapper.init_device()
    wrapper.load_model()
    model = wrapper.worker.get_model()
    layers = model.model.layers
    stats = wrapper.worker.ffnskip_stats()
    processors = list(wrapper.vllm_config.model_config.logits_processors or [])
    return {
        "model": type(model).__name__,
        "layers": sorted({type(layer).__name__ for layer in layers}),
        "num_layers": len(layers),
        "stats": stats,
        "logits_processors": processors,
    }


def test_vllm_refuses_ray_on_cpu(vllm_config):
    """The reason this module tests the mechanism, not an engine (vLLM 0.32)."""
    from vllm.platforms import current_platform
    from vllm.v1.executor.ray_utils import initialize_ray_cluster

    assert current_platform.device_type == "cpu"
    with pytest.raises(ValueError, match="current platform cpu does not support ray"):
        initialize_ray_cluster(vllm_config.parallel_config)


def test_plugin_registers_in_ray_worker(vllm_config):
    from vllm.utils.network_utils import get_open_port
    from vllm.v1.executor.ray_utils import RayWorkerWrapper

    # As RayDistributedExecutor._init_workers_ray creates each worker (no device resource:
    # the CPU platform has no Ray device key).
    actor = ray.remote(num_cpus=0, num_gpus=0)(RayWorkerWrapper).remote(rpc_rank=0)
    try:
        before = ray.get(actor.execute_method.remote(_worker_state), timeout=TIMEOUT_S)
        assert before["pid"] != os.getpid()
        # A fresh worker process: nothing of ours has run yet.
        assert before == {"pid": before["pid"], "patches_applied": False, "resolve_patched": False}

        ray.get(
            actor.execute_method.remote(
                "update_environment_variables",
                [{"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}],
            ),
            timeout=TIMEOUT_S,
        )
        kwargs = {
            "vllm_config": vllm_config,
            "local_rank": 0,
            "rank": 0,
            "distributed_init_method": f"tcp://127.0.0.1:{get_open_port()}",
            "is_driver_worker": True,
        }
        ray.get(actor.execute_method.remote("init_worker", [kwargs]), timeout=TIMEOUT_S)

        after = ray.get(actor.execute_method.remote(_worker_state), timeout=TIMEOUT_S)
        assert after["pid"] == before["pid"]
        assert after["patches_applied"], "register() did not run in the Ray worker"
        assert after["resolve_patched"], "_ModelRegistry.resolve_model_cls is not patched"
        assert after["model_cls"] == "vllm_ffnskip.model.FFNSkipLlamaForCausalLM"
        assert after["worker_cls"] == "CPUWorker"
        assert after["has_ffnskip_stats"], "worker extension not injected"

        loaded = ray.get(actor.execute_method.remote(_load_and_inspect), timeout=TIMEOUT_S)
        assert loaded["model"] == "FFNSkipLlamaForCausalLM"
        assert loaded["layers"] == ["FFNSkipDecoderLayer"]
        assert loaded["num_layers"] == 8
        assert "vllm_ffnskip.tracker:SkipPolicyTracker" in loaded["logits_processors"]
        stats = loaded["stats"]  # the collective_rpc answer, before any request
        assert stats["requests"] == {}
        assert stats["total"] == {"skipped": 0, "evaluated": 0}
        assert stats["requests_skipping"] == 0
    finally:
        try:
            ray.get(actor.execute_method.remote("shutdown"), timeout=30)
        except (ray.exceptions.RayError, TimeoutError) as e:  # the kill below ends it anyway
            print(f"worker shutdown: {e!r}")
        ray.kill(actor)
