"""Job configs: YAML in, a typed and validated JobConfig out. Configs are inert data (no I/O beyond
reading the file itself); checking them against the model happens in `cluster.plan.resolve_job`.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any


from cluster.schedule_config import ScheduleConfig, parse_schedule

RUN_ID = re.compile(r"[a-z0-9][a-z0-9_.-]{0,127}")  # matched whole (fullmatch: no trailing newline)
# neat: exact ablation; atp: first-order attribution patching; neurgrad / neg: neuron empirical
# gradients (estimate / swept slope); neuronlens: activation ranges; selectivity: probing with
# positives and negatives; ig: integrated gradients (knowledge neurons). README "Methods".
METHODS = ("neat", "atp", "prompt", "prompt-atp", "neurgrad", "neg", "neuronlens", "selectivity", "ig")
PROMPT_METHODS = ("prompt-atp", "prompt")  # in-distribution: effects on the concept's own cloze prompts
ABLATIONS = ("zero", "mean", "range")  # range: only inside the concept's NeuronLens activation range
DTYPES = ("float32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A config problem the user can fix; the message names the file, key and value."""


@dataclass(frozen=True)
class ClusterConfig:
    actors: int = 2
    cpus_per_actor: int = 1  # also the actor's torch thread count: fixes float summation order
    gpus_per_actor: float = 0
    address: str | None = None  # a running Ray cluster ("auto", "ray://..."); None starts local Ray
    # Big models (README "Big models", cluster/replicas.py): an actor with gpus_per_actor >= 2 holds a
    # replica split over its GPUs by layer; suffix actors hold only layers suffix_from_layer.. (None:
    # chosen by the planner) and score the NEAT shards of those layers. gpu_memory_gb (decimal GB per
    # GPU) lets the planner check that replicas fit and pick suffix_from_layer.
    suffix_actors: int = 0
    suffix_from_layer: int | None = None
    gpus_per_suffix_actor: float | None = None  # None: gpus_per_actor
    gpu_memory_gb: float | None = None
    # Start-up and shipping (README "Cluster preflight"): seconds to wait for the placement groups that
    # reserve every replica's resources, and for the actors to load their replicas; whether `run
    # --address` and `submit` ship the project's packages to the cluster (false: its image has them).
    placement_timeout_s: float = 60.0
    load_timeout_s: float = 1800.0
    ship_code: bool = True
    # Where `submit` places the job's driver (Ray's entrypoint_num_cpus / _memory / _resources); by
    # default it runs on the head, beside the cluster's control store.
    entrypoint_num_cpus: float | None = None
    entrypoint_memory_gb: float | None = None
    entrypoint_resources: dict[str, float] | None = None


@dataclass(frozen=True)
class MethodOptions:
    """Knobs of the methods other than NEAT; the defaults are the papers' (README "Methods")."""

    neg_sample: int = 4  # NEG: neurons per layer whose activation is swept (a seeded sample) ...
    neg_points: int = 8  # ... at this many shifts in [-2, 2] (the paper: 40; 8 fit the same slopes here)
    ig_steps: int = 20  # integrated gradients: Riemann steps from 0 to the clean activation
    range_tau: float = 2.0  # NeuronLens: the concept range is mu +- tau * sigma
    screen_top: int = 0  # AtP screen: > 0 scores exact NEAT only on AtP's top-K per concept ...
    screen_sample: int = 256  # ... plus this many random neurons (estimates what the screen misses)
    bf16_check_sample: int = 512  # dtype bf16: neurons per concept also scored in float32 (checks.bf16; 0: none)
    prompt_screen: int = 50  # method prompt: exact ablation on prompt AtP's top-K neurons per concept and ablation

    def recorded(self, methods: tuple[str, ...]) -> dict[str, Any]:
        """The options as plain data for run ids and fingerprints; a method's option only where the
        method runs (configs without it keep the run ids and fingerprints they had before it existed)."""
        data = asdict(self)
        if "prompt" not in methods:
            del data["prompt_screen"]
        return data


@dataclass(frozen=True)
class JobConfig:
    model: str
    concepts: str  # path of a concept file, absolute
    atlas: str  # directory (absolute) or fsspec URL
    layers: tuple[int, ...] | None = None  # None = all layers
    methods: tuple[str, ...] = ("neat",)
    ablation: tuple[str, ...] = ("zero",)
    dtype: str = "float32"
    device: str = "auto"
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    method_options: MethodOptions = field(default_factory=MethodOptions)
    run_id: str | None = None  # None: derived at resolve time from time and config
    batch_rows: int = 512  # rows per forward (one clean row + ablations)
    shard_neurons: int = 512  # shard size, in neurons of the most expensive layer (layer 0)
    source: str = "<flags>"  # the config file, for error messages
    # delta-rs/object_store options for the atlas (AWS_ENDPOINT_URL, AWS_REGION, keys...); None: the
    # standard AWS environment and profile chain. Never printed (repr=False) nor stored (snapshot).
    storage_options: dict[str, str] | None = field(default=None, repr=False)
    # A directory with the model's config.json (geometry only): --dry-run plans from it where the model
    # itself is not on this machine (configs/cluster/architectures/). Never used to score.
    architecture: str | None = None
    # AtP of every neuron on the reference concepts (configs/concepts/reference.yaml), for the specific
    # ranking (README "Concept-specific rankings"); false: the run stores no specificity table.
    reference_contrast: bool = True
    # When and on what to re-run this job (cluster/schedule_config.py); None: run on demand only.
    schedule: ScheduleConfig | None = None

    def snapshot(self) -> dict[str, Any]:
        """The config as plain data, for the run's metadata; credentials in storage_options redacted."""
        from storage.location import redact_options

        data = asdict(self)
        data["method_options"] = self.method_options.recorded(self.methods)
        data["layers"] = "all" if self.layers is None else list(self.layers)
        if self.storage_options is None:
            del data["storage_options"]  # configs without it keep their default run ids
        else:
            data["storage_options"] = redact_options(self.storage_options)
        if self.architecture is None:
            del data["architecture"]  # configs without it keep their default run ids
        if self.reference_contrast:
            del data["reference_contrast"]  # the default: configs without the key keep their run ids
        if self.schedule is None:
            del data["schedule"]  # configs without one keep their default run ids
        else:
            data["schedule"] = self.schedule.as_data()
        return data


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def shown(value: object, limit: int = 80) -> str:
    """repr() of a value for an error message, cut to `limit` characters (never a whole huge value)."""
    if isinstance(value, (list, tuple, dict)) and len(value) > 20:
        value = type(value)(list(value)[:20]) if not isinstance(value, dict) else dict(list(value.items())[:20])
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def _fail(source: str, key: str, value: object, expected: str) -> ConfigError:
    return ConfigError(f"config {source}: key {key!r} has value {shown(value)}: expected {expected}")


def _one_or_list(source: str, key: str, value: object, allowed: tuple[str, ...]) -> tuple[str, ...]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise _fail(source, key, value, f"one of {', '.join(allowed)} or a list of them")
    for v in values:
        if v not in allowed:
            raise _fail(source, key, v, f"one of {', '.join(allowed)}")
    return tuple(dict.fromkeys(values))


def parse_layers(source: str, value: object) -> tuple[int, ...] | None:
    if value == "all" or value is None:
        return None
    if isinstance(value, str):  # "0,5,29" from the command line
        try:
            value = [int(part) for part in value.split(",") if part.strip()]
        except ValueError:
            raise _fail(source, "layers", value, "'all' or comma-separated layer numbers like 0,5,29") from None
    if _is_int(value):
        value = [value]
    if not isinstance(value, list) or not value or not all(_is_int(v) for v in value):
        raise _fail(source, "layers", value, "'all' or a non-empty list of layer numbers")
    for v in value:
        if v < 0:
            raise _fail(source, "layers", v, "a layer number >= 0")
    return tuple(sorted(set(value)))


def _parse_cluster(source: str, value: object) -> ClusterConfig:
    if not isinstance(value, dict):
        raise _fail(source, "cluster", value, "a mapping with keys actors, cpus_per_actor, gpus_per_actor, address")
    known = ClusterConfig.__dataclass_fields__
    for key in value:
        if key not in known:
            raise ConfigError(f"config {source}: unknown key 'cluster.{key}' (expected one of {', '.join(known)})")
    out = {}
    for key in ("actors", "cpus_per_actor"):
        if key in value:
            if not _is_int(value[key]) or value[key] < 1:
                raise _fail(source, f"cluster.{key}", value[key], "an integer >= 1")
            out[key] = value[key]
    if "gpus_per_actor" in value:
        v = value["gpus_per_actor"]
        if not (_is_int(v) or isinstance(v, float)) or isinstance(v, bool) or v < 0:
            raise _fail(source, "cluster.gpus_per_actor", v, "a number >= 0")
        out["gpus_per_actor"] = v
    if "address" in value:
        if value["address"] is not None and not isinstance(value["address"], str):
            raise _fail(source, "cluster.address", value["address"], "a Ray address string")
        out["address"] = value["address"]
    for key, minimum, nullable in (("suffix_actors", 0, False), ("suffix_from_layer", 1, True)):
        if key in value and not (nullable and value[key] is None):
            if not _is_int(value[key]) or value[key] < minimum:
                raise _fail(source, f"cluster.{key}", value[key], f"an integer >= {minimum}")
            out[key] = value[key]
    for key, positive in (("gpus_per_suffix_actor", False), ("gpu_memory_gb", True)):
        v = value.get(key)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (positive and v == 0):
                raise _fail(source, f"cluster.{key}", v, "a number > 0" if positive else "a number >= 0")
            out[key] = v
    for key in ("placement_timeout_s", "load_timeout_s", "entrypoint_num_cpus", "entrypoint_memory_gb"):
        v = value.get(key)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (key.endswith("_s") and v == 0):
                raise _fail(source, f"cluster.{key}", v, "a number > 0" if key.endswith("_s") else "a number >= 0")
            out[key] = float(v)
    if "ship_code" in value:
        if not isinstance(value["ship_code"], bool):
            raise _fail(source, "cluster.ship_code", value["ship_code"], "true or false")
        out["ship_code"] = value["ship_code"]
    if value.get("entrypoint_resources") is not None:
        v = value["entrypoint_resources"]
        if not isinstance(v, dict) or not all(isinstance(k, str) and not isinstance(n, bool)
                                              and isinstance(n, (int, float)) and n >= 0 for k, n in v.items()):
            raise _fail(source, "cluster.entrypoint_resources", v, "a mapping of resource names to numbers >= 0")
        out["entrypoint_resources"] = {k: float(n) for k, n in v.items()}
    return ClusterConfig(**out)


def _parse_method_options(source: str, value: object) -> MethodOptions:
    known = MethodOptions.__dataclass_fields__
    if not isinstance(value, dict):
        raise _fail(source, "method_options", value, f"a mapping with keys {', '.join(known)}")
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key not in known:
            raise ConfigError(f"config {source}: unknown key 'method_options.{key}' "
                              f"(expected one of {', '.join(known)})")
        if key == "range_tau":
            if isinstance(item, bool) or not isinstance(item, (int, float)) or not item > 0:
                raise _fail(source, f"method_options.{key}", item, "a number > 0")
            out[key] = float(item)
            continue
        minimum = 0 if key in ("screen_top", "bf16_check_sample") else 1
        if not _is_int(item) or item < minimum:
            raise _fail(source, f"method_options.{key}", item, f"an integer >= {minimum}")
        out[key] = item
    return MethodOptions(**out)


def _resolve_path(base: Path, value: str) -> str:
    if "://" in value:
        return value
    path = Path(os.path.expanduser(value))
    return str(path if path.is_absolute() else (base / path).resolve())


def _concepts_path(base: Path, value: str) -> str:
    """`builtin` names the shipped concept file (package data); anything else is a path."""
    from configs import BUILTIN, builtin_concepts

    return str(builtin_concepts()) if value.strip() == BUILTIN else _resolve_path(base, value)


def config_from_dict(data: object, *, source: str, base_dir: Path) -> JobConfig:
    """Validate a config mapping; relative paths are relative to `base_dir` (the config's folder)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config {source}: expected a mapping of keys, got {type(data).__name__}")
    known = set(JobConfig.__dataclass_fields__) - {"source"}
    for key in data:
        if key not in known:
            raise ConfigError(f"config {source}: unknown key {shown(key)} (expected one of {', '.join(sorted(known))})")
    for key in ("model", "concepts", "atlas"):
        if key not in data:
            raise ConfigError(f"config {source}: missing required key {key!r}")
        if not isinstance(data[key], str) or not data[key].strip():
            raise _fail(source, key, data[key], "a non-empty string")
    out: dict[str, Any] = {
        "model": data["model"].strip(),
        "concepts": _concepts_path(base_dir, data["concepts"]),
        "atlas": _resolve_path(base_dir, data["atlas"]),
        "layers": parse_layers(source, data.get("layers", "all")),
        "source": source,
    }
    # A model given as a relative directory is relative to the config too, when that directory exists.
    if not os.path.isabs(out["model"]) and (base_dir / out["model"]).is_dir() and "/" in out["model"].lstrip("./"):
        out["model"] = str((base_dir / out["model"]).resolve())
    if "methods" in data:
        out["methods"] = _one_or_list(source, "methods", data["methods"], METHODS)
    if "ablation" in data:
        out["ablation"] = _one_or_list(source, "ablation", data["ablation"], ABLATIONS)
    for key, allowed in (("dtype", DTYPES), ("device", DEVICES)):
        if key in data:
            value = data[key]
            ok = isinstance(value, str) and (value in allowed or (key == "device" and re.fullmatch(r"cuda:\d+", value)))
            if not ok:
                raise _fail(source, key, value, f"one of {', '.join(allowed)}")
            out[key] = value
    if "cluster" in data:
        out["cluster"] = _parse_cluster(source, data["cluster"])
    if "method_options" in data:
        out["method_options"] = _parse_method_options(source, data["method_options"])
    if "run_id" in data and data["run_id"] is not None:
        out["run_id"] = check_run_id(source, data["run_id"])
    for key, minimum in (("batch_rows", 2), ("shard_neurons", 1)):
        if key in data:
            if not _is_int(data[key]) or data[key] < minimum:
                raise _fail(source, key, data[key], f"an integer >= {minimum}")
            out[key] = data[key]
    if data.get("architecture") is not None:
        value = data["architecture"]
        if not isinstance(value, str) or not value.strip():
            raise _fail(source, "architecture", value, "a directory holding the model's config.json")
        out["architecture"] = _resolve_path(base_dir, value.strip())
    if "reference_contrast" in data:
        if not isinstance(data["reference_contrast"], bool):
            raise _fail(source, "reference_contrast", data["reference_contrast"], "true or false")
        out["reference_contrast"] = data["reference_contrast"]
    if data.get("storage_options") is not None:
        out["storage_options"] = _parse_storage_options(source, data["storage_options"])
    if data.get("schedule") is not None:
        out["schedule"] = parse_schedule(source, data["schedule"], base_dir)
    return JobConfig(**out)


def _parse_storage_options(source: str, value: object) -> dict[str, str]:
    """A mapping of option names to strings (numbers and booleans become strings); values never echoed."""
    if not isinstance(value, dict):
        raise ConfigError(f"config {source}: key 'storage_options' must be a mapping of option names to "
                          f"strings (e.g. AWS_ENDPOINT_URL, AWS_REGION), got {type(value).__name__}")
    out = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"config {source}: key 'storage_options' has an option name {shown(key)}: expected a string")
        if isinstance(item, bool):
            item = "true" if item else "false"
        elif _is_int(item) or isinstance(item, float):
            item = str(item)
        if not isinstance(item, str):  # the value may be a secret: name its type, not its content
            raise ConfigError(f"config {source}: key 'storage_options.{key}' must be a string, "
                              f"got {type(item).__name__}")
        out[key] = item
    return out


def check_run_id(source: str, value: object) -> str:
    if not isinstance(value, str) or not RUN_ID.fullmatch(value):
        raise _fail(source, "run_id", value, f"a slug matching {RUN_ID.pattern}")
    return value


def load_job_config(path: str | Path) -> JobConfig:
    from attribution.yaml_files import YamlFileError, load_yaml_file

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = load_yaml_file(path)
    except YamlFileError as err:
        raise ConfigError(f"config {path}: {err}") from None
    return config_from_dict(data, source=str(path), base_dir=path.resolve().parent)


def apply_overrides(config: JobConfig, **flags: Any) -> JobConfig:
    """Command-line flags override config keys; None means "not given". Values are validated too."""
    source = f"{config.source} (command line)"
    changes: dict[str, Any] = {}
    if flags.get("model"):
        changes["model"] = flags["model"]
    if flags.get("concepts"):
        changes["concepts"] = _concepts_path(Path.cwd(), flags["concepts"])
    if flags.get("atlas"):
        atlas = flags["atlas"]
        changes["atlas"] = atlas if "://" in atlas else str(Path(atlas).expanduser().resolve())
    if flags.get("layers") is not None:
        changes["layers"] = parse_layers(source, flags["layers"])
    if flags.get("methods"):
        changes["methods"] = _one_or_list(source, "methods", list(flags["methods"]), METHODS)
    if flags.get("ablation"):
        changes["ablation"] = _one_or_list(source, "ablation", list(flags["ablation"]), ABLATIONS)
    if flags.get("run_id"):
        changes["run_id"] = check_run_id(source, flags["run_id"])
    for key, allowed in (("dtype", DTYPES), ("device", DEVICES)):
        if flags.get(key):
            probe = config_from_dict({"model": "m", "concepts": "c", "atlas": "a", key: flags[key]},
                                     source=source, base_dir=Path("."))
            changes[key] = getattr(probe, key)
    if flags.get("actors") is not None:
        if flags["actors"] < 1:
            raise _fail(source, "cluster.actors", flags["actors"], "an integer >= 1")
        changes["cluster"] = replace(changes.get("cluster", config.cluster), actors=flags["actors"])
    return replace(config, **changes)
