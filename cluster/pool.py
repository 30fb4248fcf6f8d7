"""The actor pool of a run: placement groups reserving each replica's resources, actor start-up that
cannot hang, and the scheduling loop that retries a failed shard on another actor and outlives dead
actors (README "Failures and retries").
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from cluster.plan import Shard

IN_FLIGHT_PER_ACTOR = 2  # one computing, one queued: no idle gap between shards
# A shard runs at most SHARD_TRIES times before the run fails, naming it. Each failure is charged to
# the shard that was computing: its code raised, or its actor died under it. Retries rewrite the same
# staged file (deterministic names), so a retried shard never duplicates rows.
SHARD_TRIES = 3
# Ray restarts a crashed actor (a new process, a fresh CUDA context) up to this many times; the driver,
# not Ray, retries the shards it held (max_task_retries=0), on another actor where one is free.
ACTOR_RESTARTS = 4
PROBE_BACKOFF = (0.2, 5.0)  # seconds before probing a restarting actor again: first, most (doubling)
# Messages of errors after which an actor's device is unusable (a sticky CUDA error poisons its
# context): the actor is restarted so Ray replaces its process; other errors leave it running.
DEVICE_ERRORS = ("CUDA error", "CUBLAS_STATUS_", "CUDNN_STATUS_", "device-side assert", "illegal memory access",
                 "NCCL error", "ECC error", "AcceleratorError", "CUDA driver error")


class PoolError(RuntimeError):
    """The pool cannot go on: a shard failed SHARD_TRIES times, or no live actor can score what is left."""


@dataclass
class ActorSlot:
    """One actor of the pool, across its restarts: its kind, state, and what its shards took."""

    kind: str = "full"  # "full" scores any shard; "suffix" only NEAT shards of late layers
    name: str = "?"  # host:pid of its current process
    state: str = "ready"  # ready | probing (died, Ray restarting it) | dead (for good)
    shards: int = 0
    compute_seconds: float = 0.0
    busy_until: float = 0.0  # seconds after scoring started when its last shard came back
    restarts: int = 0


def can_score(actor_kind: str, shard_kind: str) -> bool:
    """A full actor scores any shard; a suffix actor only the shards routed to suffix actors."""
    return actor_kind == "full" or actor_kind == shard_kind


@dataclass
class ShardQueue:
    """Shards waiting for an actor. Retries go first, and never back to an actor they failed on while
    another ready actor that can score them has not failed them; fresh shards go to their own kind of
    actor first, and a full actor with nothing of its own takes late-layer shards too."""

    route: object  # shard -> "full" | "suffix"
    fresh: dict = field(default_factory=lambda: {"full": deque(), "suffix": deque()})
    retry: list = field(default_factory=list)
    avoid: dict = field(default_factory=dict)  # shard_id -> indices of actors it failed on

    @classmethod
    def of(cls, shards: list[Shard], route) -> "ShardQueue":
        queue = cls(route)
        for shard in shards:
            queue.fresh[route(shard)].append(shard)
        return queue

    def __len__(self) -> int:
        return len(self.retry) + sum(len(q) for q in self.fresh.values())

    def put_back(self, shard: Shard, *, failed_on: int | None = None) -> None:
        if failed_on is not None:
            self.avoid.setdefault(shard.shard_id, set()).add(failed_on)
        self.retry.append(shard)

    def take(self, index: int, kind: str, others_ready) -> Shard | None:
        """The next shard for actor `index` of `kind`; others_ready(shard, avoid) tells whether a ready
        actor other than `index`, not in `avoid`, can score the shard."""
        for position, shard in enumerate(self.retry):
            if not can_score(kind, self.route(shard)):
                continue
            avoid = self.avoid.get(shard.shard_id, set())
            if index in avoid and others_ready(shard, avoid | {index}):
                continue
            return self.retry.pop(position)
        for shard_kind in (("full", "suffix") if kind == "full" else ("suffix",)):
            if self.fresh[shard_kind]:
                return self.fresh[shard_kind].popleft()
        return None

    def first(self) -> Shard | None:
        for shards in (self.retry, self.fresh["full"], self.fresh["suffix"]):
            if shards:
                return shards[0]
        return None


def device_broken(err: BaseException) -> bool:
    """True for errors after which the actor's GPU context cannot be trusted (restart the actor)."""
    cause = getattr(err, "cause", None) or err
    text = f"{type(cause).__name__}: {cause}"
    return any(marker in text for marker in DEVICE_ERRORS)


def error_line(err: BaseException) -> str:
    """'Type: message' in one line: for a shard's own exception its type and last line, for Ray's
    errors about actors (whose text runs to many lines) the first."""
    from ray.exceptions import RayTaskError

    if isinstance(err, RayTaskError) and err.cause is not None:
        err = err.cause
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        return f"{type(err).__name__}: {lines[-1] if lines else ''}"
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def score_all(actors, slots: list[ActorSlot], shards: list[Shard], *, route, progress, shard_cost,
              restart_timeout: float) -> list:
    """Keep IN_FLIGHT_PER_ACTOR shards on every ready actor until all are scored; returns ShardResults.

    A shard whose code raises is retried on another actor; an actor that dies has its shards put back
    (only the one it was computing is charged a try) and is probed until Ray has restarted it or it is
    dead for good (dropped). An actor whose device broke is restarted. Raises PoolError naming the shard
    when a shard fails SHARD_TRIES times or nothing alive can score it.
    """
    import ray
    from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

    queue = ShardQueue.of(shards, route)
    tasks: dict = {}  # ObjectRef -> (actor index, shard)
    running = [deque() for _ in actors]  # per actor, its task refs in submission order (Ray runs them in order)
    probes: dict = {}  # ObjectRef of describe() -> actor index
    probe_at: dict[int, float] = {}  # actor index -> when to probe it again
    backoffs: dict[int, float] = {}  # actor index -> seconds it waited before its last probe
    died_at: dict[int, float] = {}  # actor index -> when it died (probing until it is back or restart_timeout)
    charged: set = set()  # refs whose shard was computing when its actor died: a try is charged
    tries: dict[str, int] = {}
    results = []
    started = time.perf_counter()

    def others_ready(shard: Shard, avoid: set[int]) -> bool:
        return any(slot.state == "ready" and i not in avoid and can_score(slot.kind, route(shard))
                   for i, slot in enumerate(slots))

    def fill() -> None:
        for index, slot in enumerate(slots):
            while slot.state == "ready" and len(running[index]) < IN_FLIGHT_PER_ACTOR:
                shard = queue.take(index, slot.kind, others_ready)
                if shard is None:
                    break
                ref = actors[index].score.remote(shard)
                tasks[ref] = (index, shard)
                running[index].append(ref)

    def probe(index: int, backoff: float = 0.0) -> None:
        """Ask a dead actor's handle for describe(): it answers once Ray has restarted the actor."""
        if slots[index].state == "ready":
            slots[index].state = "probing"
            died_at[index] = time.monotonic()
        backoffs[index] = backoff
        if backoff:
            probe_at[index] = time.monotonic() + backoff
        else:
            probes[actors[index].describe.remote()] = index

    def drop(index: int, why: str) -> None:
        slots[index].state = "dead"
        died_at.pop(index, None)
        probe_at.pop(index, None)
        for ref in [ref for ref, i in probes.items() if i == index]:
            del probes[ref]
        progress.message(f"actor {slots[index].name} is dead for good ({why}); the other actors go on")

    def fail(shard: Shard, index: int, err: BaseException) -> None:
        tries[shard.shard_id] = tries.get(shard.shard_id, 0) + 1
        what = error_line(err)
        if tries[shard.shard_id] >= SHARD_TRIES:
            raise PoolError(f"shard {shard.shard_id} failed after {SHARD_TRIES} tries (last on actor "
                            f"{slots[index].name}): {what}") from err
        progress.message(f"shard {shard.shard_id} failed (try {tries[shard.shard_id]} of {SHARD_TRIES}) on actor "
                         f"{slots[index].name}: {what}; retrying on another actor")
        queue.put_back(shard, failed_on=index)

    while len(queue) or tasks:
        now = time.monotonic()
        for index, since in list(died_at.items()):
            if now - since > restart_timeout:
                drop(index, f"not restarted within {restart_timeout:.0f} s: the cluster may lack the resources")
        for index, at in list(probe_at.items()):
            if at <= now:
                del probe_at[index]
                probes[actors[index].describe.remote()] = index
        fill()
        if not tasks and not probes and not probe_at:
            shard = queue.first()
            kinds = "/".join(sorted({slot.kind for slot in slots}))
            raise PoolError(f"no live actor can score shard {shard.shard_id}: every {kinds} actor that could "
                            f"has died for good")
        # Wake for the next due probe or restart deadline; while shards compute, their results wake us too.
        wakes = list(probe_at.values()) + [since + restart_timeout for since in died_at.values()]
        timeout = max(0.0, min(wakes) - now) + 0.01 if wakes else None
        waiting = list(tasks) + list(probes)
        if not waiting:
            time.sleep(timeout)
            continue
        done, _ = ray.wait(waiting, num_returns=1, timeout=timeout)
        if not done:
            continue
        ref = done[0]
        if ref in probes:
            index = probes.pop(ref)
            try:
                info, _ = ray.get(ref)
            except ActorUnavailableError:  # not restarted yet: ask again later
                probe(index, backoff=min(max(2 * backoffs.get(index, 0.0), PROBE_BACKOFF[0]), PROBE_BACKOFF[1]))
            except (RayActorError, RayTaskError) as err:
                drop(index, error_line(err))
            else:
                slots[index].restarts += 1
                died_at.pop(index, None)
                progress.message(f"actor {slots[index].name} was restarted as {info.actor}")
                slots[index].name, slots[index].state = info.actor, "ready"
            continue
        index, shard = tasks.pop(ref)
        try:
            result = ray.get(ref)
        except RayActorError as err:
            if slots[index].state == "ready":  # a new death: the oldest of its tasks was computing
                charged.add(running[index][0])
                progress.message(f"actor {slots[index].name} died ({error_line(err)}); "
                                 f"its shards go back to the queue")
                probe(index)
            running[index].remove(ref)
            if ref in charged:
                charged.discard(ref)
                fail(shard, index, err)
            else:  # queued behind the shard that was computing: not its fault
                queue.put_back(shard)
            continue
        except RayTaskError as err:  # the shard's code raised
            running[index].remove(ref)
            fail(shard, index, err)
            if device_broken(err) and slots[index].state == "ready":
                progress.message(f"actor {slots[index].name}: its device is broken; restarting it")
                ray.kill(actors[index], no_restart=False)  # Ray starts a new process (max_restarts)
                probe(index)  # its queued shard comes back as an actor error, not charged
            continue
        running[index].remove(ref)
        results.append(result)
        slot = slots[index]
        slot.shards += 1
        slot.compute_seconds += result.seconds
        slot.busy_until = time.perf_counter() - started
        progress.update(result.rows, shard_cost(shard))
    return results
