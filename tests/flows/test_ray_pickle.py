"""Ray workers load the release's tasks and flow by module name under the qatgguf
namespace: what the task runner ships refers to `qatgguf.tasks.release` and
`qatgguf.release`, never to a top-level `tasks` or `flows` package."""

from __future__ import annotations

import pickletools


def _module_names(payload: bytes) -> set[str]:
    """Every string in the pickle that names a module of this project."""
    names = set()
    for op, arg, _pos in pickletools.genops(payload):
        if isinstance(arg, str) and arg.split(".")[0] in ("qatgguf", "flows", "tasks"):
            names.add(arg)
    return names


def test_ray_worker_unpickles_release_tasks_by_module(local_ray):
    import cloudpickle
    import ray

    from qatgguf.flows import release as flow_module
    from qatgguf.tasks import release as t

    payloads = {name: cloudpickle.dumps(getattr(t, name))
                for name in ("prepare_source", "plan_model", "quantize_shard", "assemble_gguf", "publish")}
    payloads["flow"] = cloudpickle.dumps(flow_module.release)
    for name, payload in payloads.items():
        modules = _module_names(payload)
        # the core the task body calls travels as a module reference, not by value
        assert "qatgguf.release" in modules or name == "flow", (name, modules)
        assert not any(m.split(".")[0] in ("flows", "tasks") for m in modules), (name, modules)

    @ray.remote
    def load(payload: bytes) -> tuple[str, str, str, bool]:
        import sys

        import cloudpickle

        obj = cloudpickle.loads(payload)
        fn = obj.fn
        return (obj.name, fn.__module__, fn.__globals__["core"].__name__ if "core" in fn.__globals__ else "",
                "tasks" in sys.modules or "flows" in sys.modules)

    for name in ("quantize_shard", "assemble_gguf", "publish"):
        task_name, module, core, top_level = ray.get(load.remote(payloads[name]))
        assert task_name == getattr(t, name).name
        assert module == "qatgguf.tasks.release"
        assert core == "qatgguf.release"
        assert not top_level
    flow_name, module, _core, top_level = ray.get(load.remote(payloads["flow"]))
    assert (flow_name, module, top_level) == ("release", "qatgguf.flows.release", False)
