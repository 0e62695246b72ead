"""What the runner hands a batch process: its task (which batch, at which retry rung) and
the slot it runs in (its GPUs, its torchrun port, its share of the cores).

One typed object on every path: the command line of `python -m avatarcli.worker` (local
runner, Ray task), and the JSON lines a resident worker reads. The worker sets its own
environment from its slot (`Slot.environ`), so what an engine or CUDA reads there
(CUDA_VISIBLE_DEVICES, MASTER_PORT, AVATARCLI_THREADS) follows from its arguments alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GPUS_VAR = "CUDA_VISIBLE_DEVICES"
PORT_VAR = "MASTER_PORT"
THREADS_VAR = "AVATARCLI_THREADS"  # read by the built-in engine
WORKER = (sys.executable, "-m", "avatarcli.worker")


@dataclass(frozen=True)
class Slot:
    """Where one batch runs. Engines describe their slots as environment dicts
    (`Engine.slots`); `from_env` turns one into a Slot and `engine_env` gives it back."""

    gpus: tuple[str, ...] | None = None  # GPU ids; None: not set (the machine's own)
    port: int | None = None  # torchrun's MASTER_PORT; None: each launch asks for a free one
    threads: int | None = None  # cores of a batch sharing them; None: the engine's default
    extra: tuple[tuple[str, str], ...] = ()  # any other variable an engine's slot sets

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, threads: int | None = None) -> Slot:
        rest = {k: v for k, v in env.items() if k not in (GPUS_VAR, PORT_VAR)}
        gpus = env.get(GPUS_VAR)
        port = env.get(PORT_VAR)
        return cls(gpus=None if gpus is None else tuple(g for g in gpus.split(",") if g),
                   port=None if port is None else int(port), threads=threads,
                   extra=tuple(sorted(rest.items())))

    @property
    def gpu_ids(self) -> list[str]:
        return list(self.gpus or ())

    def engine_env(self) -> dict[str, str]:
        """The slot as an engine describes it (`PartTask.env`): GPUs, port, other variables."""
        env = dict(self.extra)
        if self.gpus is not None:
            env[GPUS_VAR] = ",".join(self.gpus)
        if self.port is not None:
            env[PORT_VAR] = str(self.port)
        return env

    def environ(self) -> dict[str, str]:
        """The variables the batch process sets in its own environment."""
        env = self.engine_env()
        if self.threads is not None:
            env[THREADS_VAR] = str(self.threads)
        return env

    def to_dict(self) -> dict[str, Any]:
        return {"gpus": None if self.gpus is None else list(self.gpus), "port": self.port,
                "threads": self.threads, "extra": dict(self.extra)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Slot:
        gpus = d.get("gpus")
        return cls(gpus=None if gpus is None else tuple(str(g) for g in gpus),
                   port=None if d.get("port") is None else int(d["port"]),
                   threads=None if d.get("threads") is None else int(d["threads"]),
                   extra=tuple(sorted((str(k), str(v))
                                      for k, v in (d.get("extra") or {}).items())))


@dataclass(frozen=True)
class WorkerTask:
    """One batch for a batch process: `python -m avatarcli.worker [--rung K] [--gpus IDS]
    [--port N] [--threads N] [--extra JSON] JOB_DIR INDEX` (the index last, as `ps` shows it)."""

    job_dir: Path
    index: int
    rung: int = 0  # out-of-memory retry rung: the preset's oom_retry steps 1..rung applied
    slot: Slot = Slot()
    # The program that runs it (tests put a stand-in here); not part of the task itself.
    program: tuple[str, ...] = field(default=WORKER, compare=False)

    def argv(self) -> list[str]:
        """The arguments after the program; `parse` reads them back."""
        s = self.slot
        args = ["--rung", str(self.rung)]
        if s.gpus is not None:
            args += ["--gpus", ",".join(s.gpus)]
        if s.port is not None:
            args += ["--port", str(s.port)]
        if s.threads is not None:
            args += ["--threads", str(s.threads)]
        if s.extra:
            args += ["--extra", json.dumps(dict(s.extra), sort_keys=True)]
        return [*args, str(self.job_dir), str(self.index)]

    def command(self) -> list[str]:
        return [*self.program, *self.argv()]

    @classmethod
    def parse(cls, argv: list[str]) -> WorkerTask:
        """The task from a batch process's arguments (exits 2 with a usage line when bad)."""
        p = argparse.ArgumentParser(prog="python -m avatarcli.worker",
                                    description="Render one batch of a job (or --resident).")
        p.add_argument("job_dir", type=Path)
        p.add_argument("index", type=int)
        p.add_argument("--rung", type=int, default=0)
        p.add_argument("--gpus", default=None, help="GPU ids, comma-separated")
        p.add_argument("--port", type=int, default=None, help="torchrun's MASTER_PORT")
        p.add_argument("--threads", type=int, default=None)
        p.add_argument("--extra", type=json.loads, default={},
                       help="other environment variables of the slot, as a JSON object")
        a = p.parse_args(argv)
        gpus = None if a.gpus is None else tuple(g for g in a.gpus.split(",") if g)
        extra = tuple(sorted((str(k), str(v)) for k, v in a.extra.items()))
        return cls(a.job_dir, a.index, a.rung, Slot(gpus, a.port, a.threads, extra))

    def to_dict(self) -> dict[str, Any]:
        """The JSON line a resident worker reads (with "log" added by the pool)."""
        return {"job": str(self.job_dir), "index": self.index, "rung": self.rung,
                "slot": self.slot.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WorkerTask:
        return cls(Path(str(d["job"])), int(d["index"]), int(d.get("rung") or 0),
                   Slot.from_dict(d.get("slot") or {}))

    @property
    def name(self) -> str:
        """"JOB_DIR#INDEX": the batch, in the resident pool's records."""
        return f"{self.job_dir}#{self.index}"
