"""Where the atlas lives: `<uri>/neurons`, `<uri>/runs` (Delta tables), `<uri>/_staging/<run>/<shard>.parquet`.

`uri` is a local directory or an fsspec URL (s3://bucket/prefix). `storage_options` are delta-rs
(object_store) options such as AWS_ENDPOINT_URL; `atlas_filesystem` translates the S3 ones for s3fs.
"""
from __future__ import annotations

import os
import re
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.utils import get_protocol

NEURONS = "neurons"
RUNS = "runs"
STAGING = "_staging"

# delta-rs (object_store) S3 option -> s3fs argument. Keys are matched case-insensitively; the rest
# (AWS_ALLOW_HTTP, AWS_CONDITIONAL_PUT, ...) only concern delta-rs and are not passed to s3fs.
_S3FS_OPTIONS = {
    "aws_access_key_id": "key",
    "access_key_id": "key",
    "aws_secret_access_key": "secret",
    "secret_access_key": "secret",
    "aws_session_token": "token",
    "session_token": "token",
    "aws_endpoint_url": "endpoint_url",
    "aws_endpoint": "endpoint_url",
    "endpoint_url": "endpoint_url",
    "endpoint": "endpoint_url",
}
_S3FS_REGION = ("aws_region", "region", "aws_default_region")
_S3FS_PROFILE = ("aws_profile", "profile")
_TRUE = ("true", "1", "yes")

# Options that name where and how to connect, never who: shown as they are in config snapshots and
# run metadata. Every other option (keys, secrets, tokens, anything unknown) is redacted.
_PUBLIC_OPTIONS = re.compile(
    r"^(aws_)?(s3_)?(endpoint(_url)?|region|default_region|allow_http|conditional_put|copy_if_not_exists|"
    r"allow_unsafe_rename|locking_provider|virtual_hosted_style_request|profile|skip_signature|"
    r"max_retries|retry_timeout|timeout|connect_timeout|allow_invalid_certificates|unsigned_payload)$"
)
REDACTED = "<redacted>"


def normalize_uri(uri: str | os.PathLike) -> str:
    """The atlas URI without a trailing "/"; local paths made absolute (delta-rs needs that)."""
    text = os.fspath(uri)
    if get_protocol(text) == "file":
        text = text.removeprefix("file://")
        return os.path.abspath(os.path.expanduser(text))
    return text.rstrip("/")


def table_uri(uri: str | os.PathLike, name: str) -> str:
    """URI of one of the atlas's Delta tables (`NEURONS` or `RUNS`), as delta-rs takes it."""
    return f"{normalize_uri(uri)}/{name}"


_ENDPOINT_KEYS = ("aws_endpoint_url", "aws_endpoint", "endpoint_url", "endpoint")
_ALLOW_HTTP_KEYS = ("aws_allow_http", "allow_http")


def plain_http_endpoint(storage_options: dict | None) -> str | None:
    """The S3 endpoint (from the options, else AWS_ENDPOINT_URL) when it is http:// and HTTP is not
    already allowed; delta-rs refuses such an endpoint ("URL scheme is not allowed") unless told."""
    options = {str(k).lower(): str(v) for k, v in (storage_options or {}).items()}
    endpoint = next((options[k] for k in _ENDPOINT_KEYS if k in options), None)
    from_env = endpoint is None
    if from_env:
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT")
    allowed = any(k in options for k in _ALLOW_HTTP_KEYS) or (from_env and "AWS_ALLOW_HTTP" in os.environ)
    if endpoint and endpoint.lower().startswith("http://") and not allowed:
        return endpoint
    return None


def delta_options(storage_options: dict | None) -> dict[str, str] | None:
    """`storage_options` as delta-rs wants them: string values, None when empty; an http:// endpoint
    in them gets AWS_ALLOW_HTTP=true (an http:// AWS_ENDPOINT_URL: see `allow_plain_http`)."""
    if not storage_options:
        return None
    options = {str(k): (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in storage_options.items()}
    if plain_http_endpoint(options) and any(str(k).lower() in _ENDPOINT_KEYS for k in options):
        options["AWS_ALLOW_HTTP"] = "true"
    return options


def allow_plain_http() -> str | None:
    """An http:// AWS_ENDPOINT_URL (a local MinIO, SeaweedFS) is allowed for delta-rs by setting
    AWS_ALLOW_HTTP=true in this process; returns the endpoint when it did so (for a note), else None."""
    endpoint = plain_http_endpoint(None)
    if endpoint:
        os.environ["AWS_ALLOW_HTTP"] = "true"
    return endpoint


def redact_options(storage_options: dict | None) -> dict[str, str] | None:
    """`storage_options` safe to print or store: secrets (and any unknown option) become REDACTED.

    Endpoints keep their host but lose any user:password part.
    """
    if not storage_options:
        return None
    shown: dict[str, str] = {}
    for key, value in storage_options.items():
        low = str(key).lower()
        if _PUBLIC_OPTIONS.match(low) is None:
            shown[str(key)] = REDACTED
        elif "endpoint" in low:
            parts = urlsplit(str(value))
            host = parts.netloc.rsplit("@", 1)[-1]
            shown[str(key)] = urlunsplit(parts._replace(netloc=host))
        else:
            shown[str(key)] = str(value)
    return shown


def secret_values(storage_options: dict | None) -> list[str]:
    """The values `redact_options` hides (long enough to be credentials), to keep them out of stored data."""
    hidden = redact_options(storage_options) or {}
    return [str(v) for k, v in (storage_options or {}).items() if hidden.get(str(k)) == REDACTED and len(str(v)) >= 4]


def _fsspec_options(protocol: str, storage_options: dict | None) -> dict:
    if protocol not in ("s3", "s3a"):
        return dict(storage_options or {})
    # A fresh s3fs instance per call: fsspec caches instances by their arguments, and an empty
    # argument list would otherwise keep serving an instance made under other AWS_* variables.
    options: dict = {"skip_instance_cache": True}
    for key, value in (storage_options or {}).items():
        low = key.lower()
        if low in _S3FS_OPTIONS:
            options[_S3FS_OPTIONS[low]] = value
        elif low in _S3FS_REGION:
            options.setdefault("client_kwargs", {})["region_name"] = value
        elif low in _S3FS_PROFILE:
            options["profile"] = value
        elif low in ("aws_skip_signature", "skip_signature") and str(value).lower() in _TRUE:
            options["anon"] = True
        elif low in ("max_retries", "aws_max_retries"):
            # The same bound for s3fs as for delta-rs: botocore alone retries a refused connection for
            # ~30 s (5 attempts, exponential backoff). (s3fs's own retries, of timeouts, are a class attribute.)
            if not str(value).strip().isdigit():
                raise ValueError(f"storage option {key}={value!r}: expected a whole number of retries")
            attempts = int(value) + 1
            options.setdefault("config_kwargs", {})["retries"] = {"total_max_attempts": attempts, "mode": "standard"}
    return options


def atlas_filesystem(
    uri: str | os.PathLike, storage_options: dict | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec file system holding the atlas and the atlas's root path on it."""
    text = normalize_uri(uri)
    protocol = get_protocol(text)
    fs, root = fsspec.core.url_to_fs(text, **_fsspec_options(protocol, storage_options))
    return fs, root.rstrip("/")


def staging_dir(root: str, run_id: str) -> str:
    """Directory of a run's staged shards, under the atlas root on its file system."""
    return f"{root}/{STAGING}/{run_id}"
