"""Checks of an atlas location made before any compute: is it an atlas (read commands), can we write
there (run, validate). Each failure is one AtlasError line naming the location and what was expected.
"""
from __future__ import annotations

import os
import uuid

from fsspec.utils import get_protocol

from storage.errors import AtlasError
from storage.location import NEURONS, RUNS, STAGING, atlas_filesystem, normalize_uri, table_uri


def _local(uri: str) -> bool:
    return get_protocol(uri) == "file"


def _first_line(err: BaseException) -> str:
    from storage.read import excerpt

    text = str(err).strip().splitlines()
    return excerpt(text[0] if text else type(err).__name__, 300)


def check_not_a_file(atlas: str | os.PathLike) -> None:
    """A local `--atlas` must be a directory (or not exist yet), never a file."""
    uri = normalize_uri(atlas)
    if _local(uri) and os.path.exists(uri) and not os.path.isdir(uri):
        raise AtlasError(f"--atlas {uri} is a file: expected an atlas directory (or a new directory's path)")


def check_atlas_exists(atlas: str | os.PathLike, storage_options: dict | None = None) -> None:
    """The location holds an atlas (its `neurons` or `runs` Delta table): a wrong path is an error,
    not an empty atlas."""
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError, TableNotFoundError

    from storage.location import delta_options

    uri = normalize_uri(atlas)
    if _local(uri):
        if not os.path.isdir(uri):
            raise AtlasError(f"no atlas at {uri}: the directory does not exist")
        if not any(os.path.isdir(os.path.join(uri, name, "_delta_log")) for name in (NEURONS, RUNS)):
            raise AtlasError(f"no atlas at {uri}: it has no {NEURONS}/ or {RUNS}/ Delta table "
                             "(give the directory a run wrote to)")
        return
    for name in (NEURONS, RUNS):
        try:
            DeltaTable(table_uri(uri, name), storage_options=delta_options(storage_options))
            return
        except TableNotFoundError:
            continue
        except (DeltaError, OSError, ValueError) as e:
            raise AtlasError(f"cannot read the atlas at {uri}: {_first_line(e)}") from None
    raise AtlasError(f"no atlas at {uri}: it has no {NEURONS} or {RUNS} Delta table")


def check_atlas_writable(atlas: str | os.PathLike, storage_options: dict | None = None) -> None:
    """Write and remove a small probe file where the run stages its shards: a read-only directory, a
    file given as the atlas, or an unreachable object store fails here, before anything is computed.
    A real write, not os.access: root passes permission checks that a read-only mount still refuses."""
    uri = normalize_uri(atlas)
    check_not_a_file(uri)
    probe_name = f".write-probe-{uuid.uuid4().hex}"
    if _local(uri):
        existing = uri
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise AtlasError(f"atlas {uri}: {existing} is a file, not a directory")
        targets = [existing] + [os.path.join(uri, name) for name in (NEURONS, RUNS, STAGING)
                                if os.path.isdir(os.path.join(uri, name))]
        for directory in targets:
            probe = os.path.join(directory, probe_name)
            try:
                with open(probe, "x"):
                    pass
                os.remove(probe)
            except OSError as e:
                raise AtlasError(f"atlas {uri} is not writable: cannot create a file in {directory} "
                                 f"({e.strerror or type(e).__name__})") from None
        return
    try:
        fs, root = atlas_filesystem(uri, storage_options)
        probe = f"{root}/{STAGING}/{probe_name}"
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except Exception as e:  # noqa: BLE001  botocore, aiohttp and s3fs raise many kinds; all mean "cannot write"
        raise AtlasError(f"atlas {uri} is not writable or not reachable: {type(e).__name__}: "
                         f"{_first_line(e)}") from None
