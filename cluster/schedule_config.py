"""The `schedule:` section of a job config: when to re-run it (cron + time zone), on which model and
concept sets, where to submit it, and when a run counts as drifted. Inert data, validated like the
rest of the config (cluster/config.py); README "Nightly re-attribution".
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.cron import CronError, parse_cron, zone

NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class DriftThresholds:
    """A run drifted when, for a concept, its top-k churn exceeds max_churn or the Spearman of its
    scores with the previous run of the family falls below min_spearman (None: not checked)."""

    k: int = 100
    max_churn: float | None = None  # share of the previous top-k that left it, 0..1
    min_spearman: float | None = None  # -1..1
    movers: int = 10  # largest rank changes stored per concept

    def as_data(self) -> dict:
        return {"k": self.k, "max_churn": self.max_churn, "min_spearman": self.min_spearman, "movers": self.movers}


@dataclass(frozen=True)
class ScheduleConfig:
    cron: str  # five fields or a macro, in `timezone`
    timezone: str = "UTC"
    name: str | None = None  # the model family: runs of one name are compared for drift (default: file stem)
    address: str | None = None  # Ray Jobs API, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)
    # alias, local directory, cached hub id, or a glob / directory of checkpoints (the newest is taken);
    # None: the config's `model`.
    model: str | None = None
    concepts: tuple[str, ...] = ()  # concept sets, one run each (absolute paths); (): the config's `concepts`
    concept_set: str | None = None  # label of the concept set (default: the concept file's stem)
    methods: tuple[str, ...] = ()  # (): the config's `methods`
    retries: int = 4  # submission attempts after the first, with exponential backoff
    retry_seconds: float = 2.0  # first backoff; doubles per attempt
    drift: DriftThresholds = field(default_factory=DriftThresholds)

    def as_data(self) -> dict[str, Any]:
        """Plain data (lists, no tuples) for snapshots and the YAML a submitted job carries."""
        data = {"cron": self.cron, "timezone": self.timezone, "name": self.name, "address": self.address,
                "model": self.model, "concepts": list(self.concepts), "concept_set": self.concept_set,
                "methods": list(self.methods), "retries": self.retries, "retry_seconds": self.retry_seconds,
                "drift": self.drift.as_data()}
        return {k: v for k, v in data.items() if v not in (None, [])}  # parses back to the same config


def _fail(source: str, key: str, value: object, expected: str) -> ValueError:
    from cluster.config import ConfigError

    return ConfigError(f"config {source}: key {key!r} has value {value!r}: expected {expected}")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_drift(source: str, value: object) -> DriftThresholds:
    from cluster.config import ConfigError

    known = DriftThresholds.__dataclass_fields__
    if not isinstance(value, dict):
        raise _fail(source, "schedule.drift", value, f"a mapping with keys {', '.join(known)}")
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key not in known:
            raise ConfigError(f"config {source}: unknown key 'schedule.drift.{key}' (expected one of {', '.join(known)})")
        where = f"schedule.drift.{key}"
        if key in ("k", "movers"):
            if isinstance(item, bool) or not isinstance(item, int) or item < 1:
                raise _fail(source, where, item, "an integer >= 1")
        elif item is not None:
            low = -1.0 if key == "min_spearman" else 0.0
            if not _number(item) or not low <= item <= 1:
                raise _fail(source, where, item, f"a number in {low:g}..1 (or null: not checked)")
            item = float(item)
        out[key] = item
    return DriftThresholds(**out)


def parse_schedule(source: str, value: object, base_dir: Path) -> ScheduleConfig:
    """Validate the `schedule:` mapping; paths are relative to `base_dir` (the config's folder)."""
    from cluster.config import METHODS, ConfigError, _one_or_list, _resolve_path as resolve_path

    known = ScheduleConfig.__dataclass_fields__
    if not isinstance(value, dict):
        raise _fail(source, "schedule", value, "a mapping with at least the key cron, e.g. {cron: '0 2 * * *'}")
    for key in value:
        if key not in known:
            raise ConfigError(f"config {source}: unknown key 'schedule.{key}' (expected one of {', '.join(known)})")
    if "cron" not in value:
        raise ConfigError(f"config {source}: missing required key 'schedule.cron' (five cron fields, e.g. '0 2 * * *')")
    out: dict[str, Any] = {}
    try:
        parse_cron(value["cron"])
        out["cron"] = value["cron"].strip()
        if value.get("timezone") is not None:
            if not isinstance(value["timezone"], str):
                raise _fail(source, "schedule.timezone", value["timezone"], "an IANA time zone name such as UTC")
            zone(value["timezone"])
            out["timezone"] = value["timezone"]
    except CronError as err:
        key = "schedule.timezone" if str(err).startswith("time zone") else "schedule.cron"
        raise ConfigError(f"config {source}: key {key!r}: {err}") from None
    for key in ("name", "concept_set"):
        if value.get(key) is not None:
            if not isinstance(value[key], str) or not NAME.match(value[key]):
                raise _fail(source, f"schedule.{key}", value[key], f"a slug matching {NAME.pattern}")
            out[key] = value[key]
    for key in ("address", "model"):
        if value.get(key) is not None:
            if not isinstance(value[key], str) or not value[key].strip():
                raise _fail(source, f"schedule.{key}", value[key], "a non-empty string")
            out[key] = value[key].strip()
    model = out.get("model")
    if model and (model.startswith((".", "/", "~")) or any(c in model for c in "*?[")
                  or (base_dir / model).exists()):
        out["model"] = resolve_path(base_dir, model)  # a path or glob: relative to the config's folder
    if value.get("concepts") is not None:
        sets = [value["concepts"]] if isinstance(value["concepts"], str) else value["concepts"]
        if not isinstance(sets, list) or not sets or not all(isinstance(s, str) and s.strip() for s in sets):
            raise _fail(source, "schedule.concepts", value["concepts"], "a concept file or a list of them")
        out["concepts"] = tuple(dict.fromkeys(resolve_path(base_dir, s) for s in sets))
    if value.get("methods") is not None:
        out["methods"] = _one_or_list(source, "schedule.methods", value["methods"], METHODS)
    if "retries" in value:
        if isinstance(value["retries"], bool) or not isinstance(value["retries"], int) or value["retries"] < 0:
            raise _fail(source, "schedule.retries", value["retries"], "an integer >= 0")
        out["retries"] = value["retries"]
    if "retry_seconds" in value:
        if not _number(value["retry_seconds"]) or value["retry_seconds"] < 0:
            raise _fail(source, "schedule.retry_seconds", value["retry_seconds"], "a number of seconds >= 0")
        out["retry_seconds"] = float(value["retry_seconds"])
    if value.get("drift") is not None:
        out["drift"] = _parse_drift(source, value["drift"])
    if "name" not in out:  # the family defaults to the config file's name
        out["name"] = re.sub(r"[^a-z0-9_.-]+", "-", Path(source).stem.lower()).strip("-.")[:64] or "schedule"
    return ScheduleConfig(**out)
