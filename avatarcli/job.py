"""The job directory `OUT.parts/`: manifest (JSON), prepared inputs, parts and per-batch logs.

Only the parent process writes the manifest, always atomically, so a crash at any moment
leaves either the old or the new manifest, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avatarcli import __version__
from avatarcli.errors import InputError

MANIFEST_VERSION = 1
PART_STATES = ("pending", "running", "done", "failed")


def file_digest(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return {"path": str(path.resolve()), "size": path.stat().st_size, "sha256": h.hexdigest()}


def job_key(inputs: dict[str, Any], rendering: dict[str, Any]) -> str:
    """What decides every pixel: input contents, rendering settings, and this tool's version."""
    payload = {
        "version": __version__,
        "inputs": {k: v["sha256"] for k, v in sorted(inputs.items())},
        "rendering": rendering,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def write_json_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass
class JobDir:
    path: Path

    @classmethod
    def for_output(cls, output: Path) -> JobDir:
        return cls(output.with_name(output.name + ".parts"))

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def portrait(self) -> Path:
        return self.path / "portrait.png"

    @property
    def features(self) -> Path:
        return self.path / "features.npy"

    def part(self, index: int) -> Path:
        return self.path / "parts" / f"part-{index:04d}.mp4"

    def temp_part(self, index: int) -> Path:
        # One name per attempt: a stale attempt (say, on a node cut off from its cluster)
        # can never rename another attempt's half-written file into place.
        return self.path / "parts" / f".part-{index:04d}.{os.getpid()}.tmp.mp4"

    def log(self, index: int) -> Path:
        return self.path / "logs" / f"batch-{index:04d}.log"

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def create(self) -> None:
        for sub in ("parts", "logs"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def clear(self) -> None:
        """Remove everything but the lock file, which the caller holds."""
        if self.path.is_dir():
            for entry in self.path.iterdir():
                if entry.name == "lock":
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    def load(self) -> dict[str, Any]:
        """The manifest, checked enough that a damaged or hand-edited one is refused clearly."""
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{self.manifest_path}: job manifest is damaged ({exc}); "
                             f"rerun with --force to start the job over") from exc
        ok = (isinstance(data, dict) and data.get("manifest_version") == MANIFEST_VERSION
              and isinstance(data.get("key"), str) and isinstance(data.get("parts"), list)
              and isinstance(data.get("plan"), dict))
        if ok:
            ok = all(isinstance(p, dict) and p.get("state") in PART_STATES for p in data["parts"])
        if not ok:
            raise InputError(f"{self.manifest_path}: job manifest is damaged or from another "
                             f"version; rerun with --force to start the job over")
        return data

    def save(self, manifest: dict[str, Any]) -> None:
        manifest["updated"] = now()
        write_json_atomic(self.manifest_path, manifest)


class JobLock:
    """An exclusive lock on a job, held for the life of one process (flock: released by the
    kernel when the holder dies, so a lock left by a dead process is simply taken over).

    The lock file records who holds it, to tell the next process.
    """

    def __init__(self, job: JobDir) -> None:
        self.path = job.path / "lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl
        import socket

        from avatarcli.errors import BusyError

        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                raise BusyError(f"{self.path.parent}: busy, rendered by pid "
                                f"{holder.get('pid', '?')} on {holder.get('host', '?')} "
                                f"since {holder.get('since', '?')}") from None
            # The holder may have removed the job (and this file) between our open and lock.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        try:
            data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> JobLock:
        self.acquire()
        return self

    def __exit__(self, *_: object) -> None:
        self.release()
