"""The Ray driver: start the actor pool, score the shards that are not staged yet, commit the run.

Protocol (docs/design.md, "The atlas protocol"): actors stage one Parquet file per shard at a deterministic name;
when every planned shard is staged and whole, the driver commits all rows as one atlas version.
An interrupted run leaves only staged files: re-running the same run id recomputes the rest.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

from cluster.checks import neg_agreement
from cluster.fingerprint import run_lineage
from cluster.plan import JobPlan, Shard
from cluster.replicas import ReplicaPlan, SuffixScorer, describe_replicas, plan_replicas
from cluster.screen import screen_report, screen_shards
from cluster.progress import Progress, format_seconds
from cluster.scorer import ScorerSpec, ShardResult, ShardScorer
from cluster.contrast_step import contrast_metadata, reference_contrast, specificity_table
from storage.commit import commit_staged_run, run_committed, run_recorded
from storage.specificity import write_specificity
from storage.staging import claim_staging, delete_staging, read_staged, staged_shards

IN_FLIGHT_PER_ACTOR = 2  # one computing, one queued: no idle gap between shards
# At-least-once (docs/design.md, "The atlas protocol"). An actor whose process dies (node lost, OOM kill, crash) is
# restarted up to ACTOR_RESTARTS times and Ray re-runs its unfinished shards on it (max_task_retries);
# a shard whose code raises is resubmitted by the driver to the next free actor. Either way a shard
# runs at most SHARD_TRIES times before the run fails, naming it; retried shards rewrite the same file.
SHARD_TRIES = 3
ACTOR_RESTARTS = 4


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
    (RAY_ADDRESS, set by `neuron-atlas submit`), or start a local one; True when this call started Ray."""
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
        ray.init(address=address, runtime_env=env, logging_level="ERROR", log_to_driver=False)
    else:
        cpus = max(os.cpu_count() or 1, (cluster.actors + cluster.suffix_actors) * cluster.cpus_per_actor)
        # "local": a new cluster of our own, even where `ray start` left its address in /tmp/ray
        # (plain ray.init() would connect there and then refuse num_cpus).
        ray.init(address="local", num_cpus=cpus, num_gpus=None, object_store_memory=256 * 1024**2,
                 include_dashboard=False, runtime_env=env, logging_level="ERROR", log_to_driver=False)
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


def _start_actors(plan: JobPlan, count: int, replicas: ReplicaPlan | None = None):
    import ray

    cluster = plan.config.cluster
    spec = ScorerSpec.from_plan(plan)
    if replicas is not None:  # a replica split over the actor's GPUs (cluster/replicas.py)
        spec = replace(spec, placement=replicas.full.placement)
    remote_cls = ray.remote(
        num_cpus=cluster.cpus_per_actor, num_gpus=cluster.gpus_per_actor,
        max_restarts=ACTOR_RESTARTS, max_task_retries=SHARD_TRIES - 1,
    )(ShardScorer)
    return [remote_cls.remote(spec) for _ in range(count)]


def _start_suffix_actors(plan: JobPlan, count: int, replicas: ReplicaPlan, prepared):
    """Actors holding only layers suffix_from_layer..; `prepared` is the ObjectRef of a full actor's
    concepts, clean passes and ablation values (small CPU tensors), owned by the driver for the run."""
    import ray

    spec = replace(ScorerSpec.from_plan(plan), placement=replicas.suffix.placement)
    remote_cls = ray.remote(
        num_cpus=plan.config.cluster.cpus_per_actor, num_gpus=replicas.suffix.gpus_per_actor,
        max_restarts=ACTOR_RESTARTS, max_task_retries=SHARD_TRIES - 1,
    )(SuffixScorer)
    return [remote_cls.remote(spec, [prepared]) for _ in range(count)]  # nested: loads before it resolves


@dataclass
class ActorSlot:
    """One actor of the pool, across its restarts: when its shards finished and how long they computed."""

    shards: int = 0
    compute_seconds: float = 0.0
    busy_until: float = 0.0  # seconds after scoring started when its last shard came back


def _score_all(plan: JobPlan, actors, shards: list[Shard], progress: Progress, *, groups: list[str] | None = None,
               group_of=None) -> tuple[list[ShardResult], list[ActorSlot]]:
    """Keep IN_FLIGHT_PER_ACTOR shards queued on every actor until all are scored.

    groups[i] names actor i's replica kind and group_of(shard) the kind that scores a shard (suffix
    actors take the NEAT shards of late layers, cluster/replicas.py); by default one group does all.
    """
    import ray
    from ray.exceptions import RayTaskError

    groups = groups or ["full"] * len(actors)
    route = (lambda shard: group_of(shard) if group_of(shard) in groups else "full") if group_of else (lambda s: "full")
    queues = {kind: list(reversed([s for s in shards if route(s) == kind])) for kind in set(groups)}
    in_flight: dict = {}
    results: list[ShardResult] = []
    failures: dict[str, int] = {}
    slots = [ActorSlot() for _ in actors]
    started = time.perf_counter()

    def submit(index: int) -> None:
        pending = queues[groups[index]]
        if pending:
            shard = pending.pop()
            in_flight[actors[index].score.remote(shard)] = (index, shard)

    for index in range(len(actors)):
        for _ in range(IN_FLIGHT_PER_ACTOR):
            submit(index)
    while in_flight:
        done, _ = ray.wait(list(in_flight), num_returns=1)
        index, shard = in_flight.pop(done[0])
        try:
            result = ray.get(done[0])
        except RayTaskError as err:  # the shard's code raised: try it again, on whichever actor is free
            failures[shard.shard_id] = failures.get(shard.shard_id, 0) + 1
            if failures[shard.shard_id] >= SHARD_TRIES:
                raise RunError(f"shard {shard.shard_id} failed after {SHARD_TRIES} tries: "
                               f"{_error_name(err)}: {_first_line(err)}") from err
            progress.message(f"shard {shard.shard_id} failed (try {failures[shard.shard_id]} of {SHARD_TRIES}): "
                             f"{_error_name(err)}: {_first_line(err)}; retrying")
            queues[route(shard)].append(shard)
            submit(index)
            continue
        except Exception as err:  # its actor died more often than Ray retries (max_task_retries/max_restarts)
            raise RunError(f"shard {shard.shard_id} failed: {type(err).__name__}: {_first_line(err)}") from err
        results.append(result)
        slot = slots[index]
        slot.shards += 1
        slot.compute_seconds += result.seconds
        slot.busy_until = time.perf_counter() - started
        progress.update(result.rows, plan.shard_cost(shard))
        submit(index)
    return results, slots


def _error_name(err: Exception) -> str:
    cause = getattr(err, "cause", None)
    return type(cause).__name__ if cause is not None else type(err).__name__


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[-1] if text else ""


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
    actors = []
    try:
        actors = _start_actors(plan, actor_count, replicas)
        groups = ["full"] * actor_count
        if suffix_count:
            prepared = actors[0].prepared.remote()  # kept referenced until the run ends
            actors += _start_suffix_actors(plan, suffix_count, replicas, prepared)
            groups += ["suffix"] * suffix_count
        infos = ray.get([a.describe.remote() for a in actors])
        progress.restart()  # rates count scoring time, not Ray start-up and model loading
        results, slots = _score_all(plan, actors, todo, progress, groups=groups, group_of=replicas.group_of)
        progress.close()
        if cfg.method_options.screen_top:  # second pass: exact NEAT on what the AtP pass selected
            plan, more, more_resumed = _screen_pass(plan, actors, progress_stream, groups, replicas)
            results += more
            resumed += more_resumed
        contrast, contrast_note = _reference_contrast(plan, actors[:actor_count], progress)
        wall = time.perf_counter() - started
        metadata = run_metadata(plan, infos, results, resumed=resumed, wall_seconds=wall, slots=slots)
        metadata["checks"] = method_checks(plan, _check_rows(plan))
        if suffix_count:
            metadata["replicas"] = {"suffix_actors": suffix_count, "suffix_from_layer": replicas.suffix_from_layer}
        metadata["reference_contrast"] = contrast_metadata(contrast, contrast_note)
        effects = _effect_rows(plan) if contrast is not None else None  # read before the commit deletes staging
        # The streaming reduce: the driver holds one record batch and one ranked group at a time.
        version = commit_staged_run(cfg.atlas, run_id=plan.run_id, shard_ids=[s.shard_id for s in plan.shards],
                                    metadata=metadata, expected_rows=plan.total_rows,
                                    storage_options=cfg.storage_options)
        if contrast is not None:  # its own commit, after the run's: a run never waits on it to be readable
            write_specificity(cfg.atlas, specificity_table(effects, contrast, run_id=plan.run_id,
                                                           model=plan.model.name, layers=list(plan.layers)),
                              storage_options=cfg.storage_options)
        delete_staging(cfg.atlas, run_id=plan.run_id, storage_options=cfg.storage_options)
        if cfg.schedule is not None:  # a scheduled run: compare with the family's previous run (storage/drift.py)
            from cluster.schedule import record_run_drift

            record_run_drift(cfg, plan.run_id, stream=progress_stream)
    finally:
        for actor in actors:
            ray.kill(actor)
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
    if not plan.config.reference_contrast:
        return None, "reference_contrast: false in the config"
    if not {"neat", "atp"} & set(plan.config.methods) or not {"zero", "mean"} & set(plan.config.ablation):
        return None, "the run has no neat or atp rows with zero or mean ablation"
    progress.message(f"reference contrast: AtP of every neuron on the reference concepts, on {len(actors)} actors")
    contrast = reference_contrast(actors)
    if contrast is None:
        return None, "AtP does not run on this model's replicas (an encoder, or split replicas)"
    progress.message(f"reference contrast: {len(contrast['concepts'])} concepts in {contrast['seconds']:.1f} s")
    return contrast, ""


def _effect_rows(plan: JobPlan):
    """The staged neat and atp rows (concept, method, ablation, layer, neuron, effect) the specificity
    table is computed from."""
    ids = [s.shard_id for s in plan.shards if s.method in ("neat", "atp")]
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
    if {"neurgrad", "neg"} <= set(plan.config.methods):
        methods |= {"neurgrad", "neg"}
    ids = [s.shard_id for s in plan.shards if s.method in methods]
    return read_staged(plan.config.atlas, run_id=plan.run_id, shard_ids=ids,
                       storage_options=plan.config.storage_options)


def _screen_pass(plan: JobPlan, actors, progress_stream, groups: list[str] | None = None,
                 replicas: ReplicaPlan | None = None) -> tuple[JobPlan, list[ShardResult], int]:
    """Plan the NEAT shards of the AtP screen from the staged AtP rows and score those not staged yet."""
    cfg = plan.config
    atp_ids = [s.shard_id for s in plan.shards if s.method == "atp"]
    atp_rows = read_staged(cfg.atlas, run_id=plan.run_id, shard_ids=atp_ids, storage_options=cfg.storage_options)
    plan = replace(plan, shards=plan.shards + screen_shards(plan, atp_rows))
    todo, _ = todo_shards(plan)
    progress = Progress(shards=len(todo), rows=sum(plan.shard_rows(s) for s in todo),
                        cost=sum(plan.shard_cost(s) for s in todo), stream=progress_stream)
    neurons = sum(len(s.neurons) for s in plan.shards if s.method == "neat")
    progress.message(f"AtP screen: exact NEAT on {neurons} neurons in {len(todo)} shards")
    results, _ = _score_all(plan, actors, todo, progress, groups=groups,
                            group_of=replicas.group_of if replicas is not None else None)
    progress.close()
    screened = sum(1 for s in plan.shards if s.method == "neat")
    return plan, results, screened - len(todo)


def method_checks(plan: JobPlan, rows) -> dict:
    """Agreement between methods of the run that estimate the same thing (stored in its metadata)."""
    checks = {}
    if plan.config.method_options.screen_top:
        checks["atp_screen"] = screen_report(plan, rows)
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
             "targets_derived": c.targets_derived}
            for c in concepts
        ],
        "methods": list(plan.config.methods),
        "ablations": list(plan.config.ablation),
        "device": info.device,
        "dtype": info.dtype,
        "threads_per_actor": info.threads,
        "versions": info.versions,
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
    cluster = cfg.cluster
    if cluster.gpus_per_actor or cluster.suffix_actors or cluster.gpu_memory_gb:  # README "Big models"
        lines += describe_replicas(plan, plan_replicas(plan))
    lines += [f"warning     {w}" for w in plan.warnings]
    return "\n".join(lines)
