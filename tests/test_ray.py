"""The Ray executor: the same batches as Ray tasks, on clusters that live on this machine only.

Every Ray instance here is local: `address="local"` (one node, 2 CPUs) or
`ray.cluster_utils.Cluster` (two simulated nodes), no dashboard, logs in a temporary folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import gone

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

from avatarcli import presets  # noqa: E402
from avatarcli.errors import InputError  # noqa: E402
from avatarcli.job import JobDir  # noqa: E402
from avatarcli.media import streams as m  # noqa: E402
from avatarcli.media.verify import check_video  # noqa: E402
from avatarcli.pipeline import Result, generate  # noqa: E402
from avatarcli.ray_executor import (  # noqa: E402
    EXIT_TASK_CANCELLED,
    EXIT_TASK_LOST,
    RayExecutor,
    check_shared_paths,
)
from avatarcli.slot import Slot, WorkerTask  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SMALL = ["size=256*256", "clips_per_batch=4"]  # speech30: 4 batches of ~0.6 s each
LONG = ["size=384*384", "clips_per_batch=16"]  # speech60: 2 batches of ~3 s each
# Fast node-death detection for the simulated cluster (the defaults take ~30 s).
FAST_HEALTH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
               "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}


class Rays:
    """One Ray at a time for the module: a local instance or a two-node Cluster."""

    def __init__(self) -> None:
        self.temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: socket paths
        self.executor: RayExecutor | None = None
        self.cluster: Cluster | None = None
        self.worker_node: Any = None
        self.kind = ""

    def local(self) -> RayExecutor:
        if self.kind != "local":
            self.close()
            self.executor = RayExecutor("local", init_kwargs={
                "num_cpus": 2, "_temp_dir": str(self.temp / "local")})
            self.executor.ensure_ray()
            self.kind = "local"
        assert self.executor is not None
        return self.executor

    def two_nodes(self) -> tuple[Cluster, RayExecutor]:
        if self.kind != "cluster":
            self.close()
            self.cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": 1, "include_dashboard": False,
                "temp_dir": str(self.temp / "cluster"), "_system_config": FAST_HEALTH})
            # Two pretend GPUs on the worker node: Ray hands out their ids like real ones.
            self.worker_node = self.cluster.add_node(num_cpus=1, num_gpus=2)
            self.cluster.wait_for_nodes()
            self.executor = RayExecutor(self.cluster.address)
            self.executor.ensure_ray()
            self.kind = "cluster"
        assert self.cluster is not None and self.executor is not None
        return self.cluster, self.executor

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown()
        ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
        self.executor, self.cluster, self.worker_node, self.kind = None, None, None, ""


@pytest.fixture(scope="module")
def rays() -> Iterator[Rays]:
    r = Rays()
    # Ray's default folder (the cluster's address file goes there) inside ours, not /tmp/ray.
    (r.temp / "ray").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", str(r.temp))
        try:
            yield r
        finally:
            r.close()
            shutil.rmtree(r.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def speech60(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import fixtures  # tests/fixtures.py

    path: Path = fixtures.speech_track(tmp_path_factory.mktemp("ray-media") / "speech60.wav",
                                       seconds=60.0, seed=3)
    return path


def render(audio: Path, image: Path, out: Path, settings: list[str], *,
           executor: RayExecutor | None, jobs: int = 1) -> Result:
    """generate() with `executor` (None: local processes), keeping the job directory."""
    resolved = presets.resolve(None, presets.parse_set(settings))
    return generate(audio, image, resolved, output=out, keep_parts=True, jobs=jobs,
                    executor=executor)


def frames_md5(path: Path) -> str:
    return m.video_frames_md5(path)


def check_complete(result: Result, seconds: float) -> None:
    """The output and every part are whole; the manifest says every part is done."""
    check_video(result.output, frames=result.frames, width=result.width, height=result.height,
                fps=result.fps)
    assert abs(m.audio_seconds(result.output) - seconds) <= 1 / 25
    job = JobDir(result.job_dir)
    manifest = job.load()
    assert [p["state"] for p in manifest["parts"]] == ["done"] * len(result.batches)
    for b in result.batches:
        check_video(job.part(b.index), frames=b.frame_end - b.frame_start, width=result.width,
                    height=result.height, fps=result.fps)
    assert not list((result.job_dir / "parts").glob(".*tmp*"))  # no temporary part left


def batch_processes(job_dir: Path) -> list[psutil.Process]:
    """Live `python -m avatarcli.worker JOB_DIR INDEX` processes of a job."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            cmd = p.info["cmdline"] or []
            if (p.info["status"] != psutil.STATUS_ZOMBIE and "avatarcli.worker" in cmd
                    and str(job_dir) in cmd):
                found.append(p)
        except psutil.Error:
            continue
    return found


Background = Callable[[Callable[[], Result]], tuple[threading.Thread, dict[str, Any]]]


@pytest.fixture
def background() -> Iterator[Background]:
    """Runs a job in a thread; a test that fails early still waits for it to end."""
    threads: list[threading.Thread] = []

    def start(fn: Callable[[], Result]) -> tuple[threading.Thread, dict[str, Any]]:
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["result"] = fn()
            except BaseException as exc:
                box["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        threads.append(thread)
        thread.start()
        return thread, box

    yield start
    for thread in threads:
        thread.join(timeout=180)


def catch_batch(job_dir: Path, thread: threading.Thread, *,
                accept: Callable[[psutil.Process], bool] = lambda p: True,
                timeout: float = 90) -> tuple[psutil.Process, int]:
    """A batch process that is rendering (its temporary part exists), and its index."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert thread.is_alive(), "the job ended before a batch could be caught"
        for proc in batch_processes(job_dir):
            try:
                # The command line read when the process was listed: asking again races its
                # exit, when psutil returns an empty list (an IndexError here under load).
                index = int(proc.info["cmdline"][-1])
                temps = (job_dir / "parts").glob(f".part-{index:04d}.*.tmp.mp4")
                if accept(proc) and any(temps):
                    return proc, index
            except (psutil.Error, ValueError):
                continue
        time.sleep(0.02)
    raise AssertionError("no batch process was caught rendering")


def attempts(log: Path) -> int:
    return sum(1 for line in log.read_text().splitlines() if line.startswith("# ") and " ray node " in line)


# -- (4) resource requests, no cluster needed ---------------------------------------------------


def test_a_mixed_manifest_asks_each_rows_own_resources(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # A CPU row first, then a LiveAvatar row: the second must not inherit the first's 0 GPUs.
    from avatarcli import batch

    asked: list[tuple[str, Any]] = []

    def fake_generate(audio: Path, image: Path, resolved: Any, **kw: Any) -> Any:
        opts = kw["executor"].task_options()
        asked.append((resolved.preset.engine, (opts["num_cpus"], opts["num_gpus"])))
        return types.SimpleNamespace(check={})

    monkeypatch.setattr(batch, "generate", fake_generate)
    rows = [batch.Row(f"m.csv:{i}", tmp_path / "a.wav", tmp_path / "p.png",
                      tmp_path / f"o{i}.mp4", preset=name, resolved=presets.resolve(name))
            for i, name in enumerate(["cpu-preview", "liveavatar-80gb", "liveavatar-5x80gb"])]
    executor = RayExecutor.for_preset(rows[0].resolved.preset)  # type: ignore[union-attr]
    results = batch.run_batch(rows, executor=executor)
    assert [r.status for r in results] == ["done"] * 3
    assert asked == [("builtin", (1, 0)), ("liveavatar", (1, 1)), ("liveavatar", (1, 5))]
    assert executor.task_options()["num_gpus"] == 0  # the views left the original alone
    assert not ray.is_initialized()


def test_for_preset_asks_for_the_gpus_a_launch_needs() -> None:
    one = RayExecutor.for_preset(presets.resolve("liveavatar-80gb"))
    five = RayExecutor.for_preset(presets.resolve("liveavatar-5x80gb").preset, "local")
    cpu = RayExecutor.for_preset(presets.resolve("cpu-preview"))
    assert one.task_options()["num_gpus"] == 1
    assert five.task_options()["num_gpus"] == 5
    assert (cpu.task_options()["num_gpus"], cpu.task_options()["num_cpus"]) == (0, 1)
    for ex in (one, five, cpu):
        opts = ex.task_options()
        assert opts["max_retries"] == 2 and opts["retry_exceptions"] is False
        assert opts["num_returns"] == "streaming"
    assert not ray.is_initialized()  # options are known without a cluster
    assert RayExecutor(max_retries=0, runtime_env={"env_vars": {"A": "1"}}).task_options()[
        "runtime_env"] == {"env_vars": {"A": "1"}}
    with pytest.raises(InputError):
        RayExecutor(num_gpus_per_task=-1)
    slots = cpu.slots(3)
    assert len(slots) == 3 and all("CUDA_VISIBLE_DEVICES" not in s for s in slots)
    assert len({s["MASTER_PORT"] for s in slots}) == 3


# -- (1) same frames as the local executor --------------------------------------------------------


def test_local_cluster_renders_the_same_frames_as_local_processes(
        rays: Rays, media: dict[str, Path], tmp_path: Path) -> None:
    executor = rays.local()
    local = render(media["speech30"], media["portrait"], tmp_path / "local.mp4", SMALL,
                   executor=None)
    remote = render(media["speech30"], media["portrait"], tmp_path / "ray.mp4", SMALL,
                    executor=executor, jobs=2)
    assert len(remote.batches) == 4 and remote.rendered == [0, 1, 2, 3]
    check_complete(remote, 30.0)
    assert frames_md5(remote.output) == frames_md5(local.output)
    for i in range(4):  # each batch ran as a Ray task, and reported its telemetry from there
        log = JobDir(remote.job_dir).log(i).read_text()
        assert " ray node " in log and "ray: batch process exited with code 0" in log
        telemetry = JobDir(remote.job_dir).load()["parts"][i]["telemetry"]
        assert telemetry["peak_rss_mb"] and telemetry["frames"] > 0


# -- handles: stop() and lost tasks -----------------------------------------------------------


TICKER = [sys.executable, "-c",
          "import time\nfor i in range(600):\n    print('progress', i, flush=True)\n"
          "    time.sleep(0.05)"]


def stand_in(program: list[str], slot: Slot | None = None) -> WorkerTask:
    """A task whose batch process is `program` (it gets the task's arguments after its own)."""
    return WorkerTask(Path("/no-job"), 0, slot=slot or Slot(), program=tuple(program))


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "whole"])
def test_stop_cancels_the_task_and_kills_its_process_group(rays: Rays, tmp_path: Path,
                                                           stream: bool) -> None:
    rays.local()
    executor = RayExecutor("local", stream=stream)  # whole: how Ray Client (ray://) runs
    log = tmp_path / "batch.log"
    handle = executor.start(stand_in(TICKER), log)
    if stream:
        lines = handle.lines()
        assert [next(lines) for _ in range(3)] == ["progress 0", "progress 1", "progress 2"]
        assert handle.pid is not None
        child = psutil.Process(handle.pid)
    else:
        lines = iter(())
        deadline = time.monotonic() + 30
        while not (found := [p for p in psutil.process_iter(["cmdline"])
                             if p.info["cmdline"][:len(TICKER)] == TICKER]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        child = found[0]
        time.sleep(0.3)
    handle.stop()
    assert handle.wait() == EXIT_TASK_CANCELLED
    assert gone(child.pid, 5, poll=0.05), "the batch process outlived its cancelled task"
    list(lines)  # the stream has ended
    assert "ray: task stopped" in log.read_text()
    assert handle.telemetry()["wall_s"] > 0
    handle.stop()  # harmless once it has ended


# Prints once, then only waits: nothing but the worker's watchdog can notice its parent go.
QUIET = [sys.executable, "-c",
         "import os, time\nfrom avatarcli.worker import watch_parent\n"
         "watch_parent(os.getppid())\nprint('progress 0', flush=True)\ntime.sleep(120)"]


def test_without_streaming_the_lines_come_at_the_end(rays: Rays, tmp_path: Path) -> None:
    rays.local()
    executor = RayExecutor("local", stream=False)
    assert RayExecutor("ray://head:10001").task_options()["num_returns"] == 1
    assert executor.task_options()["num_returns"] == 1
    handle = executor.start(stand_in([*TICKER[:2], TICKER[2].replace("600", "5")]),
                            tmp_path / "batch.log")
    assert list(handle.lines()) == [f"progress {i}" for i in range(5)]
    assert handle.wait() == 0 and handle.telemetry()["wall_s"] > 0


def test_a_task_that_exhausts_its_retries_exits_non_zero(rays: Rays, tmp_path: Path) -> None:
    rays.local()
    executor = RayExecutor("local", max_retries=0)  # shares the running instance
    log = tmp_path / "batch.log"
    handle = executor.start(stand_in(QUIET), log)
    assert next(handle.lines()) == "progress 0"
    assert handle.pid is not None
    child = psutil.Process(handle.pid)
    worker = child.parent()
    assert worker is not None and worker.name().startswith("ray::")
    worker.kill()  # what ray.cancel(force=True) or a dying node does; no retry is left
    assert gone(child.pid, 2, poll=0.05), "the batch process did not stop itself when its Ray worker died"
    assert handle.wait() == EXIT_TASK_LOST
    assert "ray: task lost: node died or its worker crashed" in log.read_text()


# -- (2) a Ray worker killed mid-batch: retried, output whole -------------------------------------


def test_killed_ray_worker_is_retried_and_the_output_is_whole(
        rays: Rays, media: dict[str, Path], speech60: Path, tmp_path: Path,
        background: Background) -> None:
    executor = rays.local()
    out = tmp_path / "talk.mp4"
    job_dir = JobDir.for_output(out).path
    thread, box = background(lambda: render(speech60, media["portrait"], out, LONG,
                                               executor=executor))
    batch, index = catch_batch(job_dir, thread)
    worker = batch.parent()
    assert worker is not None and worker.name().startswith("ray::")  # a Ray worker
    os.kill(worker.pid, signal.SIGKILL)
    # The batch process sees its parent vanish and stops itself (the worker's watchdog).
    assert gone(batch.pid, 3, poll=0.05), "the batch process outlived the Ray worker that started it"
    thread.join(timeout=120)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    result: Result = box["result"]
    check_complete(result, 60.0)
    assert result.frames == 1500
    assert attempts(JobDir(job_dir).log(index)) == 2  # Ray ran the task again


# -- (5) shared paths ----------------------------------------------------------------------------


def test_check_shared_paths_names_the_node_and_the_missing_path(rays: Rays,
                                                               tmp_path: Path) -> None:
    cluster, executor = rays.two_nodes()
    executor.check_shared_paths([Path(sys.executable), tmp_path], writable=[tmp_path])
    missing = tmp_path / "not-on-any-node.wav"
    with pytest.raises(InputError) as err:
        executor.check_shared_paths([Path(sys.executable), missing])
    text = str(err.value)
    node_ids = [n["NodeID"][:12] for n in ray.nodes() if n["Alive"]]
    assert len(node_ids) == 2
    for node_id in node_ids:  # each node is named, with the path it lacks
        assert any(node_id in line and f"{missing}: missing" in line
                   for line in text.splitlines())
    assert str(Path(sys.executable)) not in text
    # The module-level form the CLI calls: the RayExecutor made last in this process.
    latest = RayExecutor(cluster.address)
    with pytest.raises(InputError, match="not-on-any-node"):
        check_shared_paths([missing])
    del latest


# Prints the slot it was given, read from its arguments as the worker reads them.
SLOT_PRINTER = [sys.executable, "-c",
                "import sys\nfrom avatarcli.slot import WorkerTask\n"
                "slot = WorkerTask.parse(sys.argv[1:]).slot\n"
                "print('gpus', ','.join(slot.gpu_ids), flush=True)\n"
                "print('port', slot.port, flush=True)"]


def test_gpu_tasks_get_the_gpus_and_a_port_of_their_node(rays: Rays, tmp_path: Path) -> None:
    cluster, _ = rays.two_nodes()
    executor = RayExecutor(cluster.address, num_gpus_per_task=1)
    assert [n["NodeID"] for n in executor.check_resources()] == [rays.worker_node.node_id]
    slot = Slot(gpus=("7",), port=29101)  # the driver's, meaningless on the node
    handle = executor.start(stand_in(SLOT_PRINTER, slot), tmp_path / "batch.log")
    seen = dict(line.split(" ", 1) for line in handle.lines())
    assert handle.wait() == 0
    assert seen["gpus"] in ("0", "1")  # one GPU of the worker node, as Ray assigned it
    assert 0 < int(seen["port"]) < 65536  # a port free on that node
    assert handle.node is not None and rays.worker_node.node_id[:12] in handle.node
    with pytest.raises(InputError, match="no node of the Ray cluster has 1 CPU and 5 GPU"):
        RayExecutor(cluster.address, num_gpus_per_task=5).check_resources()


# -- (3) a node removed mid-job ------------------------------------------------------------------


def test_removing_a_node_mid_job_still_gives_a_whole_output(
        rays: Rays, media: dict[str, Path], speech60: Path, tmp_path: Path,
        background: Background) -> None:
    cluster, executor = rays.two_nodes()
    node = rays.worker_node
    raylet = node.all_processes["raylet"][0].process.pid
    out = tmp_path / "talk.mp4"
    job_dir = JobDir.for_output(out).path
    thread, box = background(lambda: render(speech60, media["portrait"], out, LONG,
                                               executor=executor, jobs=2))

    def on_worker_node(proc: psutil.Process) -> bool:
        parent = proc.parent()  # the Ray worker; its parent is its node's raylet
        return parent is not None and parent.ppid() == raylet

    batch, index = catch_batch(job_dir, thread, accept=on_worker_node)
    # Hold the caught batch still while its node goes: a quiet machine could otherwise finish
    # it in the moment between catching and removing, and there would be nothing to retry.
    ray_worker = batch.parent()
    batch.suspend()
    assert not JobDir(job_dir).part(index).exists(), "the caught batch had already finished"
    cluster.remove_node(node, allow_graceful=False)
    rays.worker_node = None
    # Let it go only once the node's Ray worker (its parent) is dead: resumed earlier, it could
    # finish and be reported before that worker noticed its raylet was gone.
    if ray_worker is not None:
        _, alive = psutil.wait_procs([ray_worker], timeout=30)
        assert not alive, "the removed node's Ray worker outlived it"
    with contextlib.suppress(psutil.Error):
        batch.resume()  # it then finds its parent gone and stops itself
    assert gone(batch.pid, 30, poll=0.05), "the batch process outlived its node"
    thread.join(timeout=150)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    result: Result = box["result"]
    check_complete(result, 60.0)
    assert attempts(JobDir(job_dir).log(index)) == 2
    manifest = json.loads((job_dir / "manifest.json").read_text())
    assert all(p["state"] == "done" for p in manifest["parts"])
