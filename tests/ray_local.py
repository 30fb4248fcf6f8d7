"""A local Ray of 2 CPUs for the tests that run jobs (a plain module: `conftest` names clash across folders)."""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def local_ray_session():
    """ray.init with a capped object store and offline workers; shut down on exit."""
    import ray

    ray.init(num_cpus=2, object_store_memory=128 * 1024**2, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    try:
        yield
    finally:
        ray.shutdown()
