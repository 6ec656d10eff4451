"""Worker functions of multi-process elastic tests (run by ``tests/_dist.py``)."""

from __future__ import annotations


def runner_timeout_applied(rank: int, world_size: int, run_dir: str):
    """An ElasticWorker started in a group made with torch's default timeout: the default
    group, and a DeviceMesh's groups made afterwards, get ``SCALAI_TIMEOUT``."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from scalai.elastic.worker import ElasticWorker

    def seconds(group) -> float:
        return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()

    env = {"SCALAI_RUN_DIR": run_dir, "SCALAI_GENERATION": "0", "SCALAI_HOST": "host0", "SCALAI_HOSTS": "host0",
           "SCALAI_GPUS_PER_HOST": str(world_size), "SCALAI_STORES": "host0=http://127.0.0.1:1",
           "SCALAI_JOB": "j", "SCALAI_RESUME": "0", "SCALAI_COMMIT_EVERY": "0", "SCALAI_DUMP_VERSION": "d",
           "SCALAI_TIMEOUT": "42"}
    before = seconds(dist.group.WORLD)
    ElasticWorker.from_env(env).started(rank)
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp",))
    return {"before": before, "world": seconds(dist.group.WORLD), "mesh": seconds(mesh["dp"].get_group())}
