"""The Ray driver: start the actor pool, score the shards that are not staged yet, commit the run.

Protocol (docs/design.md, "The atlas protocol"): actors stage one Parquet file per shard at a deterministic name;
when every planned shard is staged and whole, the driver commits all rows as one atlas version.
An interrupted run leaves only staged files: re-running the same run id recomputes the rest.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace

import pyarrow.compute as pc

from attribution.models import PLANNED_ONLY, read_model_config
from cluster.capacity import ray_memory
from cluster.config import PROMPT_METHODS
from cluster.checks import bf16_agreement, bf16_sample, neg_agreement
from cluster.fingerprint import run_lineage
from cluster.plan import JobPlan, Shard
from cluster.pool import (ACTOR_RESTARTS, IN_FLIGHT_PER_ACTOR, SHARD_TRIES, ActorSlot, PoolError,  # noqa: F401
                          error_line, score_all)
from cluster.preflight import Demand, check_nodes, check_resources, cluster_nodes
from cluster.replicas import ReplicaPlan, SuffixScorer, describe_replicas, plan_replicas
from cluster.screen import prompt_screen_report, prompt_screen_shards, screen_report, screen_shards
from cluster.progress import Progress, format_seconds
from cluster.scorer import ScorerSpec, ShardResult, ShardScorer
from cluster.contrast_step import contrast_metadata, reference_contrast, specificity_table
from storage.commit import commit_staged_run, run_committed, run_recorded
from storage.specificity import write_specificity
from storage.staging import claim_staging, delete_staging, read_staged, staged_shards

# At-least-once (docs/design.md, "The atlas protocol"): scheduling, retries on another actor and dead
# actors are cluster/pool.py's (IN_FLIGHT_PER_ACTOR, SHARD_TRIES, ACTOR_RESTARTS); retried shards
# rewrite the same staged file.


class RunError(RuntimeError):
    """The run failed; the atlas is unchanged. The message names the shard or step."""


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    atlas: str
    version: int
    rows: int
    neurons: int
    shards: int
    shards_resumed: int
    seconds: float
    neuron_scores_per_second: float

    def as_dict(self) -> dict:
        return asdict(self)


def todo_shards(plan: JobPlan) -> tuple[list[Shard], int]:
    """Shards without a whole staged file of the planned row count (resume), and how many are done."""
    staged = staged_shards(plan.config.atlas, run_id=plan.run_id, storage_options=plan.config.storage_options)
    todo = [s for s in plan.shards if staged.get(s.shard_id) != plan.shard_rows(s)]
    return todo, len(plan.shards) - len(todo)


def _connect_ray(plan: JobPlan) -> bool:
    """Connect to the configured cluster, or to the cluster of the Ray job this driver runs in
    (RAY_ADDRESS, set by `neuron-atlas submit`), or start a local one; True when this call started Ray.

    Ray's own messages (infeasible resource requests among them) go to stderr at WARNING level; the
    workers' output stays in Ray's logs, so stdout carries only the run's JSON summary.
    """
    import ray

    if ray.is_initialized():
        return False
    cluster = plan.config.cluster
    # Inside a Ray job the job's runtime env already sets some variables; ray.init refuses to merge
    # a runtime env that sets them again, so pass only the others.
    job_vars = _job_env_var_names()
    env_vars = {k: v for k, v in {"TOKENIZERS_PARALLELISM": "false", **_forwarded_env()}.items() if k not in job_vars}
    env = {"env_vars": env_vars}
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        # A cluster this process connects to from outside: ship the project's packages unless the
        # cluster's image has them (cluster.ship_code: false). A submitted job's driver (RAY_JOB_CONFIG_JSON_ENV_VAR)
        # runs in the job's working directory, which carries them already.
        ship = cluster.ship_code and "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ
        code = tempfile.mkdtemp(prefix="neuron-atlas-code-") if ship else None
        try:
            if code:
                from cluster.submit import copy_packages

                copy_packages(code)
                env["working_dir"] = code
            ray.init(address=address, runtime_env=env, logging_level="WARNING", log_to_driver=False)
        finally:
            if code:
                shutil.rmtree(code, ignore_errors=True)  # uploaded by ray.init
    else:
        cpus = max(os.cpu_count() or 1, (cluster.actors + cluster.suffix_actors) * cluster.cpus_per_actor)
        # "local": a new cluster of our own, even where `ray start` left its address in /tmp/ray
        # (plain ray.init() would connect there and then refuse num_cpus).
        ray.init(address="local", num_cpus=cpus, num_gpus=None, object_store_memory=256 * 1024**2,
                 include_dashboard=False, runtime_env=env, logging_level="WARNING", log_to_driver=False)
    return True


def _forwarded_env() -> dict[str, str]:
    names = ("NEURON_ATLAS_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return {name: os.environ[name] for name in names if name in os.environ}


def _job_env_var_names() -> set[str]:
    """Environment variables set by the runtime env of the Ray job this process runs in, if any."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return set()
    try:
        return set(json.loads(raw).get("runtime_env", {}).get("env_vars", {}) or {})
    except (ValueError, AttributeError):
        return set()


def _describe_cluster() -> str:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    res = ray.cluster_resources()
    return (f"Ray cluster: {len(nodes)} node{'s' if len(nodes) != 1 else ''}, {res.get('CPU', 0):g} CPUs, "
            f"{res.get('GPU', 0):g} GPUs")


@dataclass
class Pool:
    """The run's actors (full first, then suffix), one placement group each, and what they said at start."""

    actors: list = field(default_factory=list)
    slots: list[ActorSlot] = field(default_factory=list)
    placement_groups: list = field(default_factory=list)
    infos: list = field(default_factory=list)  # (ScorerInfo, concept summaries) of each actor that started
    prepared: object = None  # ObjectRef of the full replica's preparation the suffix actors hold

    def live_full_actors(self) -> list:
        """Full actors that are up now (after the scoring pass: for the driver's follow-up tasks)."""
        return [actor for actor, slot in zip(self.actors, self.slots) if slot.kind == "full" and slot.state == "ready"]

    def close(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            ray.kill(actor)
        for group in self.placement_groups:
            remove_placement_group(group)


def _demands(plan: JobPlan, replicas: ReplicaPlan, actor_count: int, suffix_count: int) -> list[Demand]:
    cluster = plan.config.cluster
    demands = [Demand("full", actor_count, cluster.cpus_per_actor, cluster.gpus_per_actor,
                      _actor_memory(plan, cluster.gpus_per_actor))]
    if suffix_count:
        demands.append(Demand("suffix", suffix_count, cluster.cpus_per_actor, replicas.suffix.gpus_per_actor,
                              _actor_memory(plan, replicas.suffix.gpus_per_actor,
                                            first_layer=replicas.suffix_from_layer)))
    return demands


def _actor_memory(plan: JobPlan, gpus: float, *, first_layer: int = 0) -> int:
    """Bytes of host memory an actor reserves from Ray (its placement group bundle and its `memory=`), from the
    planner (cluster/capacity.py): its whole allocation on a CPU, its host side on GPUs; 0 (not reserved) for an
    encoder, whose probing methods are small, or an architecture the planner does not count."""
    if plan.encoder:
        return 0
    try:
        return ray_memory(read_model_config(plan.model), engine=plan.config.dtype, gpus=gpus,
                          batch_rows=plan.config.batch_rows, concepts=len(plan.concepts),
                          ablations=len(plan.config.ablation), first_layer=first_layer)
    except Exception:  # noqa: BLE001 - not counted by the planner: not reserved
        return 0


def preflight(plan: JobPlan, demands: list[Demand], progress: Progress) -> None:
    """Before any compute: the cluster holds the replicas, every node that may host one has the model
    and can write the staging area. Raises RunError naming what is missing."""
    import ray

    nodes = cluster_nodes()
    reason = check_resources(demands, [node["resources"] for node in nodes])
    if reason:
        raise RunError(f"preflight: the plan {reason}")
    hosts = [node for node in nodes if any(
        node["resources"].get("CPU", 0) >= d.cpus and node["resources"].get("GPU", 0) >= d.gpus for d in demands)]
    here = ray.get_runtime_context().get_node_id()
    if [node["id"] for node in hosts] == [here]:
        return  # only this machine: the plan resolved the model here and the staging area is claimed
    cfg = plan.config
    reason, answers = check_nodes(hosts, model_path=plan.model.path, atlas=cfg.atlas, run_id=plan.run_id,
                                  storage_options=cfg.storage_options)
    if reason:
        raise RunError(f"preflight: {reason}")
    shipped = all("runtime_resources" in answer["code"] for answer in answers)  # Ray's working_dir copies
    progress.message(f"preflight: {len(answers)} nodes have the model and can write the staging area"
                     + ("; they run the code shipped with this run" if shipped else ""))


def _reserve(pool: Pool, demands: list[Demand], timeout: float) -> None:
    """One STRICT_PACK placement group per actor (its CPUs and GPUs on one node), all ready within `timeout`."""
    import ray
    from ray.util.placement_group import placement_group

    for demand in demands:
        for _ in range(demand.actors):
            pool.placement_groups.append(placement_group([demand.bundle()], strategy="STRICT_PACK"))
    ready = {group.ready(): group for group in pool.placement_groups}
    _, pending = ray.wait(list(ready), num_returns=len(ready), timeout=timeout)
    if pending:
        free = ray.available_resources()
        shapes = ", ".join(f"{d.actors} x {d.bundle()}" for d in demands if d.actors)
        raise RunError(f"preflight: {len(pending)} of {len(ready)} replicas ({shapes}) could not be reserved within "
                       f"{timeout:.0f} s; the cluster has {free.get('CPU', 0):g} CPUs and {free.get('GPU', 0):g} GPUs "
                       f"free (other jobs may hold the rest; cluster.placement_timeout_s waits longer)")


def _actor_options(plan: JobPlan, demand: Demand, group) -> dict:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # max_task_retries=0: the driver retries a dead actor's shards itself, on another actor (cluster/pool.py).
    # memory= equals the bundle's, so the actor fits the placement group reserved for it.
    return dict(num_cpus=demand.cpus, num_gpus=demand.gpus, memory=demand.memory or None,
                max_restarts=ACTOR_RESTARTS, max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0))


def _start_actors(plan: JobPlan, demand: Demand, replicas: ReplicaPlan | None, groups, prepared=None):
    """Full actors, one per placement group; `prepared` is the ObjectRef of the first actor's preparation
    (None: they prepare themselves)."""
    import ray

    spec = ScorerSpec.from_plan(plan)
    if replicas is not None:  # a replica split over the actor's GPUs (cluster/replicas.py)
        spec = replace(spec, placement=replicas.full.placement)
    remote_cls = ray.remote(ShardScorer)
    args = (spec,) if prepared is None else (spec, [prepared])  # nested: the actor loads before it resolves
    return [remote_cls.options(**_actor_options(plan, demand, group)).remote(*args) for group in groups]


def _start_suffix_actors(plan: JobPlan, demand: Demand, replicas: ReplicaPlan, prepared, groups):
    """Actors holding only layers suffix_from_layer..; `prepared` is the ObjectRef of a full actor's
    concepts, clean passes and ablation values (small CPU tensors), owned by the driver for the run."""
    import ray

    spec = replace(ScorerSpec.from_plan(plan), placement=replicas.suffix.placement)
    remote_cls = ray.remote(SuffixScorer)
    return [remote_cls.options(**_actor_options(plan, demand, group)).remote(spec, [prepared])  # nested: see above
            for group in groups]


def _start_pool(plan: JobPlan, replicas: ReplicaPlan, demands: list[Demand], pool: Pool, progress: Progress) -> None:
    """Reserve every replica, start the actors, wait until they have loaded; drop those that died at start."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    cluster = plan.config.cluster
    _reserve(pool, demands, cluster.placement_timeout_s)
    full, suffix = demands[0].actors, sum(d.actors for d in demands[1:])
    # One preparation per run (cluster/prepare.py): the first actor's, shared by every other actor.
    pool.actors += _start_actors(plan, demands[0], replicas, pool.placement_groups[:1])
    pool.prepared = pool.actors[0].prepared.remote()  # kept referenced until the run ends (restarts)
    pool.actors += _start_actors(plan, demands[0], replicas, pool.placement_groups[1:full], pool.prepared)
    pool.slots += [ActorSlot(kind="full") for _ in range(full)]
    if suffix:
        pool.actors += _start_suffix_actors(plan, demands[1], replicas, pool.prepared, pool.placement_groups[full:])
        pool.slots += [ActorSlot(kind="suffix") for _ in range(suffix)]
    refs = {actor.describe.remote(): index for index, actor in enumerate(pool.actors)}
    _, pending = ray.wait(list(refs), num_returns=len(refs), timeout=cluster.load_timeout_s)
    if pending:
        raise RunError(f"{len(pending)} of {len(refs)} actors did not load their replica within "
                       f"{cluster.load_timeout_s:.0f} s (cluster.load_timeout_s)")
    first_error = None
    for ref, index in refs.items():
        try:
            info, concepts = ray.get(ref)
        except (RayActorError, RayTaskError) as err:
            pool.slots[index].state = "dead"
            first_error = first_error or err
            progress.message(f"a {pool.slots[index].kind} actor failed to start and is dropped: {error_line(err)}")
            continue
        pool.slots[index].name = info.actor
        pool.infos.append((info, concepts))
    if not any(slot.state == "ready" and slot.kind == "full" for slot in pool.slots):
        raise RunError(f"no actor started: {error_line(first_error)}")


def _score_all(plan: JobPlan, pool: Pool, shards: list[Shard], progress: Progress,
               route) -> tuple[list[ShardResult], list[ActorSlot]]:
    """Score `shards` on the pool (cluster/pool.py); the slots' timings of this pass."""
    for slot in pool.slots:
        slot.shards, slot.compute_seconds, slot.busy_until = 0, 0.0, 0.0
    try:
        results = score_all(pool.actors, pool.slots, shards, route=route, progress=progress,
                            shard_cost=plan.shard_cost, restart_timeout=plan.config.cluster.load_timeout_s)
    except PoolError as err:
        raise RunError(str(err)) from err
    return results, [replace(slot) for slot in pool.slots]


def run_job(plan: JobPlan, *, progress_stream=None) -> RunSummary:
    """Score every planned shard on the actor pool and commit the run as one atlas version."""
    import ray

    cfg = plan.config
    if run_committed(cfg.atlas, plan.run_id, storage_options=cfg.storage_options):
        if run_recorded(cfg.atlas, plan.run_id, storage_options=cfg.storage_options):
            raise RunError(f"run {plan.run_id!r} is already committed in atlas {cfg.atlas}: choose another --run-id")
        return _repair_runs_row(plan, progress_stream)
    replicas = plan_replicas(plan)  # raises ConfigError before anything starts when a replica cannot fit
    started = time.perf_counter()
    claim_staging(cfg.atlas, run_id=plan.run_id, fingerprint=plan.fingerprint, storage_options=cfg.storage_options)
    todo, resumed = todo_shards(plan)
    progress = Progress(shards=len(todo), rows=sum(plan.shard_rows(s) for s in todo),
                        cost=sum(plan.shard_cost(s) for s in todo), stream=progress_stream)
    late = sum(1 for s in todo if replicas.group_of(s) == "suffix")
    suffix_count = min(cfg.cluster.suffix_actors, late)
    actor_count = max(1, min(cfg.cluster.actors, len(todo) - late))  # one at least: it prepares the concepts
    suffix_text = f" + {suffix_count} suffix actors (layers {replicas.suffix_from_layer}..)" if suffix_count else ""
    progress.message(
        f"run {plan.run_id}: {plan.model.name}, {len(plan.layers)} layers, {len(plan.concepts)} concepts, "
        f"{len(plan.shards)} shards ({resumed} already staged), {actor_count} actors{suffix_text}"
    )
    started_ray = _connect_ray(plan)
    progress.message(_describe_cluster())
    pool = Pool()
    try:
        demands = _demands(plan, replicas, actor_count, suffix_count)
        preflight(plan, demands, progress)
        _start_pool(plan, replicas, demands, pool, progress)
        infos = pool.infos
        progress.restart()  # rates count scoring time, not Ray start-up and model loading
        route = (lambda shard: replicas.group_of(shard)) if suffix_count else (lambda shard: "full")
        results, slots = _score_all(plan, pool, todo, progress, route)
        progress.close()
        # Before the screens' second pass: the prompt screen picks specific candidates against it.
        contrast, contrast_note = _reference_contrast(plan, pool.live_full_actors(), progress)
        if cfg.method_options.screen_top or "prompt" in cfg.methods:  # exact scores of what AtP selected
            plan, more, more_resumed = _screen_pass(plan, pool, progress_stream, route, contrast)
            results += more
            resumed += more_resumed
        wall = time.perf_counter() - started
        metadata = run_metadata(plan, infos, results, resumed=resumed, wall_seconds=wall, slots=slots)
        metadata["checks"] = method_checks(plan, _check_rows(plan))
        if plan.config.dtype == "bf16" and "neat" in plan.config.methods and not plan.encoder:
            metadata["checks"]["bf16"] = _bf16_check(plan, pool.live_full_actors()[0])
        if suffix_count:
            metadata["replicas"] = {"suffix_actors": suffix_count, "suffix_from_layer": replicas.suffix_from_layer}
        metadata["reference_contrast"] = contrast_metadata(contrast, contrast_note)
        effects = _effect_rows(plan) if contrast is not None else None  # read before the commit deletes staging
        choices = _measured_choice(plan, effects, contrast, pool.live_full_actors(), progress)
        if choices is not None:
            metadata["measured_choice"] = choices["metadata"]
        # The streaming reduce: the driver holds one record batch and one ranked group at a time.
        version = commit_staged_run(cfg.atlas, run_id=plan.run_id, shard_ids=[s.shard_id for s in plan.shards],
                                    metadata=metadata, expected_rows=plan.total_rows,
                                    storage_options=cfg.storage_options)
        if contrast is not None:  # its own commit, after the run's: a run never waits on it to be readable
            penalties = None if choices is None else choices["penalties"]
            write_specificity(cfg.atlas, specificity_table(effects, contrast, run_id=plan.run_id, model=plan.model.name,
                                                           layers=list(plan.layers), penalties=penalties),
                              storage_options=cfg.storage_options)
        delete_staging(cfg.atlas, run_id=plan.run_id, storage_options=cfg.storage_options)
        if cfg.schedule is not None:  # a scheduled run: compare with the family's previous run (storage/drift.py)
            from cluster.schedule import record_run_drift

            record_run_drift(cfg, plan.run_id, stream=progress_stream)
    finally:
        pool.close()
        if started_ray:
            ray.shutdown()
    seconds = time.perf_counter() - started
    computed = sum(r.rows for r in results)
    return RunSummary(run_id=plan.run_id, atlas=cfg.atlas, version=version, rows=plan.total_rows,
                      neurons=sum(len(s.neurons) for s in plan.shards), shards=len(plan.shards),
                      shards_resumed=resumed, seconds=round(seconds, 2),
                      neuron_scores_per_second=round(computed / seconds, 1) if seconds else 0.0)


def _reference_contrast(plan: JobPlan, actors, progress: Progress) -> tuple[dict | None, str]:
    """The reference set's AtP effects for the specific ranking (cluster/contrast_step.py), or why not."""
    cfg = plan.config
    if not cfg.reference_contrast:
        return None, "reference_contrast: false in the config"
    vectors = bool({"neat", "atp"} & set(cfg.methods) and {"zero", "mean"} & set(cfg.ablation))
    prompts = "prompt-atp" in cfg.methods  # its ablations are zero or mean (cluster/plan.py)
    if not (vectors or prompts):
        return None, "the run has no neat, atp or prompt rows with zero or mean ablation"
    where = " and ".join(w for w, on in (("concept vectors", vectors), ("prompts", prompts)) if on)
    progress.message(f"reference contrast: AtP of every neuron on the reference concepts' {where}, "
                     f"on {len(actors)} actors")
    contrast = reference_contrast(actors, progress, vectors=vectors, prompts=prompts)
    if contrast is None:
        return None, "AtP does not run on this model's replicas (an encoder, or split replicas)"
    progress.message(f"reference contrast: {len(contrast['concepts'])} concepts in {contrast['seconds']:.1f} s")
    return contrast, ""


def _measured_choice(plan: JobPlan, effects, contrast: dict | None, actors, progress: Progress) -> dict | None:
    """Each concept's prompt ranking chosen by measuring candidate sets on real prompts
    (cluster/measured_step.py), or None where the run has no prompt rows with a reference contrast."""
    if contrast is None or not contrast.get("prompt_effects") or "prompt" not in plan.config.methods:
        return None
    from attribution.specificity import MEASURED_K
    from cluster.measured_step import measured_choices
    from storage.specificity import prompt_contrasts

    contrasts = prompt_contrasts(effects, contrast["prompt_effects"], contrast["concepts"], run_id=plan.run_id)
    if not contrasts:
        return None
    progress.message(f"measured choice: the top-{MEASURED_K} of {len(contrasts)} concept(s) at several penalties, "
                     f"ablated on their prompts and the contrast concepts' prompts, and validate's random baseline "
                     f"on their prompts (cached on the actors' nodes), on {len(actors)} actors")
    choices = measured_choices(actors, contrasts, progress, baseline_layers=list(plan.layers))
    progress.message(f"measured choice: {len(contrasts)} concept(s) in {choices['seconds']:.1f} s")
    return choices


def _effect_rows(plan: JobPlan):
    """The staged neat, atp, prompt-atp and prompt rows (concept, method, ablation, layer, neuron, effect)
    the specificity table is computed from."""
    ids = [s.shard_id for s in plan.shards if s.method in ("neat", "atp", "prompt-atp", "prompt")]
    rows = read_staged(plan.config.atlas, run_id=plan.run_id, shard_ids=ids, storage_options=plan.config.storage_options)
    return rows.select(["concept", "method", "ablation", "layer", "neuron", "effect"])


def _repair_runs_row(plan: JobPlan, progress_stream=None) -> RunSummary:
    """A rerun of a run whose `neurons` commit landed but whose driver died before the runs row."""
    cfg = plan.config
    started = time.perf_counter()
    # The staged record holds the first attempt's metadata; this rerun's is only a fallback.
    version = commit_staged_run(cfg.atlas, run_id=plan.run_id, shard_ids=[], metadata={"repaired": True},
                                storage_options=cfg.storage_options)
    delete_staging(cfg.atlas, run_id=plan.run_id, storage_options=cfg.storage_options)
    print(f"run {plan.run_id}: committed before without its runs row; added the row (atlas version {version})",
          file=progress_stream or sys.stderr, flush=True)
    return RunSummary(run_id=plan.run_id, atlas=cfg.atlas, version=version, rows=plan.total_rows,
                      neurons=sum(len(s.neurons) for s in plan.shards), shards=len(plan.shards),
                      shards_resumed=len(plan.shards), seconds=round(time.perf_counter() - started, 2),
                      neuron_scores_per_second=0.0)


def _check_rows(plan: JobPlan):
    """The staged rows the metadata's method checks read (only the methods they compare), else none."""
    methods = set()
    if plan.config.method_options.screen_top:
        methods |= {"atp", "neat"}
    if "prompt" in plan.config.methods:
        methods |= set(PROMPT_METHODS)
    if {"neurgrad", "neg"} <= set(plan.config.methods):
        methods |= {"neurgrad", "neg"}
    ids = [s.shard_id for s in plan.shards if s.method in methods]
    return read_staged(plan.config.atlas, run_id=plan.run_id, shard_ids=ids,
                       storage_options=plan.config.storage_options)


def _screen_pass(plan: JobPlan, pool: Pool, progress_stream, route,
                 contrast: dict | None) -> tuple[JobPlan, list[ShardResult], int]:
    """The second pass: plan the exact shards of the screens (NEAT after AtP, prompt after prompt-atp)
    from the staged first-pass rows (and the reference contrast's prompt AtP) and score those not staged."""
    cfg = plan.config
    first = [s.shard_id for s in plan.shards if s.method in ("atp", "prompt-atp")]
    rows = read_staged(cfg.atlas, run_id=plan.run_id, shard_ids=first, storage_options=cfg.storage_options)
    more: tuple[Shard, ...] = ()
    parts = []
    if cfg.method_options.screen_top:
        more += screen_shards(plan, rows.filter(pc.equal(rows["method"], "atp")))
        parts.append(f"exact NEAT on {sum(len(s.neurons) for s in more)} neurons")
    if "prompt" in cfg.methods:
        reference = None if contrast is None else contrast["prompt_effects"]
        prompt = prompt_screen_shards(plan, rows.filter(pc.equal(rows["method"], "prompt-atp")), reference)
        more += prompt
        parts.append(f"exact prompt ablation of {sum(len(s.neurons) for s in prompt)} (concept, neuron) pairs")
    plan = replace(plan, shards=plan.shards + more)
    todo, _ = todo_shards(plan)
    progress = Progress(shards=len(todo), rows=sum(plan.shard_rows(s) for s in todo),
                        cost=sum(plan.shard_cost(s) for s in todo), stream=progress_stream)
    progress.message(f"screen: {'; '.join(parts)} in {len(todo)} shards")
    results, _ = _score_all(plan, pool, todo, progress, route)
    progress.close()
    return plan, results, len(more) - len(todo)


def _bf16_check(plan: JobPlan, actor) -> list[dict]:
    """Scores a seeded sample of neurons with the float32 engine on one full actor (cluster/checks.py),
    against the staged NEAT rows of the shards holding the sample."""
    import ray

    count = plan.config.method_options.bf16_check_sample
    if not count or plan.config.method_options.screen_top:  # a screened run has NEAT rows only where screened
        return []
    sample = bf16_sample(plan.layers, plan.d_mlp, count)
    picked = {(layer, neuron) for layer, neurons in sample for neuron in neurons}
    ids = [s.shard_id for s in plan.shards
           if s.method == "neat" and any((s.layer, neuron) in picked for neuron in s.neurons)]
    rows = read_staged(plan.config.atlas, run_id=plan.run_id, shard_ids=ids, storage_options=plan.config.storage_options)
    return bf16_agreement(rows, sample, ray.get(actor.float32_effects.remote(sample)),
                          ablation=plan.config.ablation[0])


def method_checks(plan: JobPlan, rows) -> dict:
    """Agreement between methods of the run that estimate the same thing (stored in its metadata)."""
    checks = {}
    if plan.config.method_options.screen_top:
        checks["atp_screen"] = screen_report(plan, rows)
    if "prompt" in plan.config.methods:
        checks["prompt_screen"] = prompt_screen_report(rows)
    if {"neurgrad", "neg"} <= set(plan.config.methods):
        checks["neg_vs_neurgrad"] = neg_agreement(rows)
    return checks


def run_metadata(plan: JobPlan, infos, results: list[ShardResult], *, resumed: int, wall_seconds: float,
                 slots: list[ActorSlot] = ()) -> dict:
    """What the atlas records with the run: config, targets, base log p, versions, device, timings.

    Actors are keyed "host:pid"; an actor that Ray restarted appears again under its new pid.
    """
    info, concepts = infos[0]
    per_actor: dict[str, dict] = {}
    for result in results:
        entry = per_actor.setdefault(result.actor, {"shards": 0, "rows": 0, "seconds": 0.0})
        entry["shards"] += 1
        entry["rows"] += result.rows
        entry["seconds"] += result.seconds
    for actor_info, _ in infos:
        entry = per_actor.setdefault(actor_info.actor, {"shards": 0, "rows": 0, "seconds": 0.0})
        entry.update(load_seconds=round(actor_info.load_seconds, 3),
                     prepare_seconds=round(actor_info.prepare_seconds, 3))
    for slot in slots:  # which replica each actor held (full or suffix), under its last process's name
        if slot.name in per_actor:
            per_actor[slot.name]["kind"] = slot.kind
    for entry in per_actor.values():
        entry["seconds"] = round(entry["seconds"], 3)
        if entry["seconds"]:
            entry["neuron_scores_per_second"] = round(entry["rows"] / entry["seconds"], 1)
    # Scheduling overhead: per actor slot, the wall time from the start of scoring to its last shard
    # minus the time its shards computed (dispatch, result transfer, restarts after a failure).
    by_method: dict[str, float] = {}
    for result in results:  # shard ids start with their method: "neat-L003-n000000-000512"
        method = result.shard_id.split("-", 1)[0]
        by_method[method] = round(by_method.get(method, 0.0) + result.seconds, 2)
    busy = sum(slot.busy_until for slot in slots)
    compute = sum(slot.compute_seconds for slot in slots)
    scheduling = {"actor_wall_seconds": round(busy, 3), "compute_seconds": round(compute, 3),
                  "overhead_seconds": round(busy - compute, 3),
                  "overhead_share": round((busy - compute) / busy, 4) if busy else 0.0}
    return {
        "run_id": plan.run_id,
        "config": plan.config.snapshot(),
        "model": {"name": plan.model.name, "revision": plan.model.revision, "model_type": plan.model_type,
                  "n_layers": plan.n_layers, "d_mlp": plan.d_mlp},
        "layers": list(plan.layers),
        "concepts": [
            {"name": c.name, "target_ids": list(c.target_ids), "target_tokens": list(c.target_tokens),
             "target_words": list(c.target_words), "base_log_p": c.base_log_p,
             "targets_derived": c.targets_derived, "baseline": c.baseline}
            for c in concepts
        ],
        "methods": list(plan.config.methods),
        "ablations": list(plan.config.ablation),
        "device": info.device,
        "dtype": info.dtype,
        "threads_per_actor": info.threads,
        "versions": info.versions,
        "precision": info.precision,
        "shards": {"planned": len(plan.shards), "resumed": resumed, "computed": len(results)},
        "timings": {"wall_seconds": round(wall_seconds, 2),
                    "compute_seconds": round(sum(r.seconds for r in results), 2),
                    "actors": per_actor, "methods": by_method, "scheduling": scheduling},
        "warnings": list(plan.warnings),
        **run_lineage(plan),  # fingerprint (and schedule): why this run happened (cluster/fingerprint.py)
    }


# Measured on this project's 2-core CPU machine (README, Benchmarks): float32 matrix multiplies reach
# about 60-75 GFLOP/s per core, bf16 difference propagation about twice that end to end.
CPU_FLOPS_PER_CORE = {"float32": 60e9, "bf16": 120e9}


def describe_plan(plan: JobPlan) -> str:
    """The resolved plan as a person reads it (--dry-run)."""
    cfg = plan.config
    flops_per_second = CPU_FLOPS_PER_CORE[cfg.dtype]
    layers = plan.layers
    layer_text = f"all {plan.n_layers}" if len(layers) == plan.n_layers else ", ".join(map(str, layers))
    workers = cfg.cluster.actors * cfg.cluster.cpus_per_actor
    estimate = plan.estimated_flops() / (flops_per_second * max(1, workers))
    lines = [
        f"run id      {plan.run_id}",
        f"model       {plan.model.name} ({plan.model_type}, revision {plan.model.revision}, {plan.model.path})",
        f"layers      {layer_text} of {plan.n_layers}; {plan.d_mlp} neurons each",
        f"methods     {', '.join(cfg.methods)}; ablation {', '.join(cfg.ablation)}; dtype {cfg.dtype}; device {cfg.device}",
        f"atlas       {cfg.atlas}",
        f"concepts    {len(plan.concepts)} from {cfg.concepts}",
    ]
    for rc in plan.concepts:
        tokens = ", ".join(f"{w}->{t!r}({i})" for w, t, i in zip(rc.targets.words, rc.targets.strings, rc.targets.ids))
        if plan.encoder:
            tokens = "not used (an encoder: probing methods only)"
        elif plan.model.revision == PLANNED_ONLY:
            tokens = f"{len(rc.concept.targets)} words, checked when the job starts (no tokenizer on this machine)"
        elif rc.targets.pending:
            tokens = "none given: derived by each actor from the concept vector (recorded in the run)"
        lines.append(f"  {rc.concept.name:<20} {len(rc.concept.examples)} examples; targets {tokens}")
    sizes = sorted({len(s.neurons) for s in plan.shards})
    lines += [
        f"shards      {len(plan.shards)} ({sizes[0]}..{sizes[-1]} neurons, balanced by cost), "
        f"{plan.total_rows:,} rows",
        f"cluster     {cfg.cluster.actors} actors x {cfg.cluster.cpus_per_actor} CPU, "
        f"{cfg.cluster.gpus_per_actor} GPU; {cfg.batch_rows} rows per forward",
        f"estimate    {plan.estimated_flops() / 1e12:.1f} TFLOP, about {format_seconds(estimate)} "
        f"at {flops_per_second / 1e9:.0f} GFLOP/s per CPU core ({cfg.dtype}; a GPU is much faster)",
    ]
    if cfg.method_options.screen_top:
        lines.append(f"then        exact NEAT on AtP's top {cfg.method_options.screen_top} per concept and ablation and "
                     f"{cfg.method_options.screen_sample} sampled neurons (planned after the atp pass)")
    if "prompt" in cfg.methods:
        most = 2 * cfg.method_options.prompt_screen  # the largest estimates and the specific candidates
        worst = sum(plan.shard_cost(Shard("prompt", 0, 0, most, tuple(range(most)), concept=rc.concept.name))
                    for rc in plan.concepts) * 2.0 * plan.macs_per_block
        lines.append(f"then        exact prompt ablation of up to {most} candidates per concept and ablation (planned "
                     f"after the prompt-atp pass): at most {worst / 1e12:.1f} TFLOP more, about "
                     f"{format_seconds(worst / (flops_per_second * max(1, workers)))}")
    cluster = cfg.cluster
    if cluster.gpus_per_actor or cluster.suffix_actors or cluster.gpu_memory_gb:  # README "Big models"
        lines += describe_replicas(plan, plan_replicas(plan))
    lines += [f"warning     {w}" for w in plan.warnings]
    return "\n".join(lines)
