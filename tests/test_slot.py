"""The batch process's task and slot, the exit codes, and the process helpers."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from avatarcli import procs, worker
from avatarcli.errors import (
    AvatarError,
    EngineError,
    EnvironmentProblem,
    ExitStatus,
    InputError,
    OutOfMemoryError,
)
from avatarcli.runner import Runner
from avatarcli.slot import Slot, WorkerTask

README = Path(__file__).resolve().parents[1] / "README.md"


def test_a_task_survives_the_command_line_and_the_resident_json_line() -> None:
    slot = Slot.from_env({"CUDA_VISIBLE_DEVICES": "2,3", "MASTER_PORT": "29101", "X": "y"},
                         threads=4)
    task = WorkerTask(Path("/jobs/a b"), 7, 2, slot)
    assert WorkerTask.parse(task.argv()) == task
    assert WorkerTask.from_dict(task.to_dict()) == task
    # Engines get back exactly the environment dict their slots() described.
    assert slot.engine_env() == {"CUDA_VISIBLE_DEVICES": "2,3", "MASTER_PORT": "29101",
                                 "X": "y"}
    assert slot.environ()["AVATARCLI_THREADS"] == "4"
    # No GPUs named is not the same as an empty GPU list (CUDA_VISIBLE_DEVICES="").
    assert WorkerTask.parse(WorkerTask(Path("j"), 0).argv()).slot.gpus is None
    empty = WorkerTask(Path("j"), 0, slot=Slot(gpus=()))
    assert WorkerTask.parse(empty.argv()).slot.engine_env() == {"CUDA_VISIBLE_DEVICES": ""}


def test_the_worker_takes_its_task_from_its_arguments(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    seen: list[WorkerTask] = []
    monkeypatch.setattr(worker, "render_part", seen.append)
    monkeypatch.setattr(worker, "watch_parent", lambda parent: None)
    monkeypatch.delenv("AVATARCLI_RUNG", raising=False)
    code = worker.main(["--rung", "2", "--gpus", "4,5", "--threads", "2", str(tmp_path), "3"])
    assert code == ExitStatus.OK
    assert seen == [WorkerTask(tmp_path, 3, 2, Slot(gpus=("4", "5"), threads=2))]
    with pytest.raises(SystemExit) as bad:
        worker.main([str(tmp_path)])  # no index: usage, exit 2 as before
    assert bad.value.code == ExitStatus.INPUT


class _Handle:
    def __init__(self, rc: int) -> None:
        self.rc, self.pid = rc, 1

    def lines(self) -> Iterator[str]:
        return iter(())

    def wait(self) -> int:
        return self.rc

    def stop(self) -> None:
        pass

    def telemetry(self) -> dict[str, Any]:
        return {}


class _Executor:
    """Records the tasks it is asked to start; the first ones run out of memory."""

    def __init__(self, codes: list[int]) -> None:
        self.codes = codes
        self.tasks: list[WorkerTask] = []

    def slots(self, jobs: int) -> None:
        return None

    def for_row(self, preset: Any) -> _Executor:
        return self

    def start(self, task: WorkerTask, log_path: Path) -> _Handle:
        self.tasks.append(task)
        return _Handle(self.codes.pop(0))


def test_an_out_of_memory_retry_hands_the_next_rung_and_the_same_slot(tmp_path: Path) -> None:
    ex = _Executor([ExitStatus.OUT_OF_MEMORY, ExitStatus.OK])
    runner = Runner(tmp_path, lambda i: tmp_path / f"batch-{i}.log", executor=ex, oom_rungs=1,
                    slots=[{"CUDA_VISIBLE_DEVICES": "1", "MASTER_PORT": "29101"}])
    runner.run([5])
    assert [(t.index, t.rung) for t in ex.tasks] == [(5, 0), (5, 1)]
    for t in ex.tasks:  # what the batch process will parse from its command line
        assert t.command()[-1] == "5"  # the index last, where `ps` (and test_ray) find it
        got = WorkerTask.parse(t.command()[3:])
        assert got.slot.gpu_ids == ["1"] and got.slot.port == 29101 and got.rung == t.rung
        assert got.slot.threads is None  # one slot: the engine's default


def test_concurrent_slots_share_the_cores(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AVATARCLI_THREADS", raising=False)
    runner = Runner(tmp_path, lambda i: tmp_path / "log", slots=[{}, {}])
    assert {s.threads for s in runner.slots} == {max(1, (psutil.cpu_count() or 1) // 2)}
    monkeypatch.setenv("AVATARCLI_THREADS", "3")
    runner = Runner(tmp_path, lambda i: tmp_path / "log", slots=[{}, {}])
    assert {s.threads for s in runner.slots} == {3}


def test_a_failed_batch_exits_with_the_code_the_runner_reads(tmp_path: Path) -> None:
    def raising(exc: BaseException) -> int:
        def fail() -> None:
            raise exc
        return worker._exit_code(fail)

    assert raising(OutOfMemoryError("x")) == ExitStatus.OUT_OF_MEMORY == 4
    assert raising(EnvironmentProblem("x")) == ExitStatus.ENVIRONMENT == 74
    assert raising(OSError(28, "No space left on device")) == ExitStatus.ENVIRONMENT
    assert raising(EngineError("x")) == raising(AvatarError("x")) == ExitStatus.ENGINE == 3
    # The parent gone is not a bug: its own code, not the internal error's 70.
    assert raising(worker.Orphaned("x")) == ExitStatus.ORPHANED != ExitStatus.INTERNAL
    assert InputError.exit_code == 2 and OutOfMemoryError.exit_code == 4


def test_the_readme_lists_every_exit_code_avatar_uses() -> None:
    text = README.read_text(encoding="utf-8")
    table = text[text.index("## Exit codes"):]
    table = table[:table.index("\n\n", table.index("| code"))]
    documented = {int(c) for c in re.findall(r"^\| (\d+)", table, re.MULTILINE)}
    documented |= {int(c) for c in re.findall(r"^\| (\d+) / (\d+)", table, re.MULTILINE)[0]}
    ours = {s.value for s in ExitStatus if s is not ExitStatus.ORPHANED}
    assert documented == ours | {ExitStatus.interrupted(2), ExitStatus.interrupted(15)}


def test_kill_group_stops_the_process_and_what_it_started(tmp_path: Path) -> None:
    log = tmp_path / "batch.log"
    proc = procs.spawn([sys.executable, "-c", "import subprocess, sys, time\n"
                        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                        "print('started', flush=True)\ntime.sleep(60)"], log, header="test")
    assert proc.stdout is not None and proc.stdout.readline() == b"started\n"
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children
    started = time.monotonic()
    procs.kill_group(proc, grace_s=5)
    assert proc.returncode is not None and time.monotonic() - started < 5
    _gone, alive = psutil.wait_procs(children, timeout=5)
    assert alive == []
    assert re.match(r"# \S+ \S+ test\n", log.read_text())
    procs.kill_group(proc)  # harmless once it has ended
