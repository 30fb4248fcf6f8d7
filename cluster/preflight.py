"""Checks before any compute (README "Cluster preflight"): the cluster can hold the plan's replicas
(CPUs, GPUs, memory), and every node that may host an actor has the model and can write the atlas's
staging area. An infeasible plan fails in seconds with one line naming what is missing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

NODE_CHECK_SECONDS = 120  # a node's check task: a worker start (and the shipped code's set-up on first use)


@dataclass(frozen=True)
class Demand:
    """What each actor of one kind reserves (one placement group bundle, on one node)."""

    kind: str  # "full" | "suffix"
    actors: int
    cpus: float
    gpus: float
    memory: float = 0.0  # host bytes one actor reserves (the planner's estimate): 0 when unknown

    def bundle(self) -> dict[str, float]:
        """The placement group bundle of one actor: what Ray reserves for it on one node."""
        return {name: value for name, value in (("CPU", self.cpus), ("GPU", self.gpus), ("memory", self.memory))
                if value}


def _amount(resource: str, value: float) -> str:
    if resource == "memory":
        return f"{value / 1e9:.1f} GB of memory"
    unit = {"CPU": "CPU", "GPU": "GPU"}[resource]
    return f"{value:g} {unit}{'' if value == 1 else 's'}"


def check_resources(demands: list[Demand], nodes: list[dict[str, float]]) -> str | None:
    """One line saying what the cluster lacks for the demands, or None when they fit.

    nodes: the total resources of each alive node (Ray's "CPU", "GPU", "memory"). A replica must fit one
    node (its placement group is STRICT_PACK); all replicas together must fit the nodes (first fit,
    largest first). Memory counts per replica and in total: actors reserve it.
    """
    demands = [d for d in demands if d.actors > 0]
    totals = {r: sum(n.get(r, 0.0) for n in nodes) for r in ("CPU", "GPU", "memory")}
    for demand in demands:
        for resource, need in (("GPU", demand.gpus), ("CPU", demand.cpus), ("memory", demand.memory)):
            largest = max((n.get(resource, 0.0) for n in nodes), default=0.0)
            if need > largest:
                replica = "replica" if demand.kind == "full" else f"{demand.kind} replica"
                where = (f"the cluster has {_amount(resource, totals[resource])}" if len(nodes) <= 1
                         or largest == totals[resource] else
                         f"the largest of its {len(nodes)} nodes has {_amount(resource, largest)} "
                         f"(the cluster {_amount(resource, totals[resource])})")
                return f"needs {_amount(resource, need)} per {replica} (on one node), {where}"
    for resource in ("GPU", "CPU"):
        need = sum(d.actors * (d.gpus if resource == "GPU" else d.cpus) for d in demands)
        if need > totals[resource] + 1e-9:
            parts = " + ".join(f"{d.actors} {d.kind} actors x {_amount(resource, d.gpus if resource == 'GPU' else d.cpus)}"
                               for d in demands if (d.gpus if resource == "GPU" else d.cpus))
            return f"needs {parts} = {_amount(resource, need)}, the cluster has {_amount(resource, totals[resource])}"
    free = [dict(n) for n in nodes]
    for demand in sorted(demands, key=lambda d: (d.gpus, d.cpus), reverse=True):
        for _ in range(demand.actors):
            node = next((n for n in free if n.get("GPU", 0.0) >= demand.gpus - 1e-9
                         and n.get("CPU", 0.0) >= demand.cpus - 1e-9), None)
            if node is None:
                shape = ", ".join(f"{n.get('CPU', 0):g} CPU/{n.get('GPU', 0):g} GPU" for n in nodes)
                return (f"needs {sum(d.actors for d in demands)} replicas of "
                        + " and ".join(f"{_amount('CPU', d.cpus)} + {_amount('GPU', d.gpus)}" for d in demands)
                        + f" each on one node; the nodes ({shape}) cannot hold them all")
            node["GPU"] = node.get("GPU", 0.0) - demand.gpus
            node["CPU"] = node.get("CPU", 0.0) - demand.cpus
    return None


def cluster_nodes() -> list[dict]:
    """Alive nodes of the connected Ray cluster: {"id", "ip", "resources"}."""
    import ray

    return [{"id": n["NodeID"], "ip": n.get("NodeManagerAddress", "?"), "resources": dict(n.get("Resources", {}))}
            for n in ray.nodes() if n.get("Alive")]


def check_node(model_path: str, atlas: str, run_id: str, storage_options: dict | None) -> dict:
    """On one node: the model directory is there, the staging area takes a file; where the code is from."""
    import socket
    import uuid

    import cluster
    from storage.location import atlas_filesystem, staging_dir

    problems = []
    path = Path(model_path)
    if not (path / "config.json").is_file():
        problems.append(f"model directory {model_path} is missing (no config.json)")
    elif not any(path.glob("*.safetensors")):
        problems.append(f"model directory {model_path} has no *.safetensors weights")
    try:
        fs, root = atlas_filesystem(atlas, storage_options)
        directory = staging_dir(root, run_id)
        fs.makedirs(directory, exist_ok=True)
        probe = f"{directory}/.preflight-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except Exception as err:  # noqa: BLE001 - reported as the node's problem
        text = str(err).strip().splitlines()
        problems.append(f"cannot write the atlas's staging area ({atlas}): {type(err).__name__}: "
                        f"{text[0] if text else ''}")
    return {"host": socket.gethostname(), "problems": problems,
            "code": str(Path(cluster.__file__).resolve().parent.parent)}


def check_nodes(nodes: list[dict], *, model_path: str, atlas: str, run_id: str, storage_options: dict | None,
                timeout: float = NODE_CHECK_SECONDS) -> tuple[str | None, list[dict]]:
    """check_node on every given node (a zero-CPU task pinned to it); (one line naming the first node
    with a problem or None, each node's answer)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(check_node)
    refs = {task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["id"], soft=False))
            .remote(model_path, atlas, run_id, storage_options): node for node in nodes}
    done, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
    answers = []
    for ref in refs:
        node = refs[ref]
        where = f"node {node['ip']} ({node['id'][:8]})"
        if ref in pending:
            return f"{where} did not answer the preflight check within {timeout:.0f} s", answers
        try:
            answer = ray.get(ref)
        except Exception as err:  # noqa: BLE001 - e.g. the shipped code does not import there
            text = [line for line in str(err).strip().splitlines() if line.strip()]
            return f"{where}: the preflight check failed: {text[-1] if text else type(err).__name__}", answers
        answers.append({**answer, "node": node["id"], "ip": node["ip"]})
        if answer["problems"]:
            return f"{where}: {'; '.join(answer['problems'])}", answers
    return None, answers
