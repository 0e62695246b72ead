"""Hostile inputs and environments (issue 11): nothing lost, nothing misreported.

Each test names the class of the issue it covers. Exit codes: 2 your input, 74 your
environment, 3/4 the engine, 70 a bug (none here).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ffmpeg_wrapper, gone
from typer.testing import CliRunner

from avatarcli.cli import app
from avatarcli.media import ffmpeg_bin, portrait
from avatarcli.media import streams as m

runner = CliRunner()
SMALL = ["--set", "size=256*256"]


def avatar(*args: str, env: dict[str, str] | None = None,
           **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "avatarcli", *args], capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL,
                          env={**os.environ, **(env or {})}, **kwargs)


def listing(folder: Path) -> dict[str, float]:
    return {str(p): p.lstat().st_mtime for p in folder.rglob("*")}


def error_lines(output: str) -> list[str]:
    return [ln for ln in output.splitlines() if "error" in ln.lower()]


@pytest.fixture(autouse=True)
def fresh_ffmpeg() -> Iterator[None]:
    """Tests that point FFMPEG_BINARY elsewhere must not leave the cached binary behind."""
    ffmpeg_bin.ffmpeg_exe.cache_clear()
    yield
    ffmpeg_bin.ffmpeg_exe.cache_clear()


# -- 1. an output created while the job renders is kept ---------------------------------------


def test_output_that_appears_while_rendering_is_not_overwritten(
        media: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import avatarcli.media.assemble as assemble_mod

    out = tmp_path / "talk.mp4"
    real_verify = assemble_mod.verify_output

    def someone_else_writes_the_output(*args: Any, **kwargs: Any) -> None:
        real_verify(*args, **kwargs)
        out.write_bytes(b"theirs")  # another program, after our start-up check

    monkeypatch.setattr(assemble_mod, "verify_output", someone_else_writes_the_output)
    result = runner.invoke(app, ["gen", str(media["speech6"]), str(media["portrait"]),
                                 "-o", str(out), *SMALL])
    assert result.exit_code == 2, result.output
    assert "appeared while the job was rendering" in result.output
    assert out.read_bytes() == b"theirs"
    # Theirs, and our job (kept for a resume); no temporary beside them.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["talk.mp4", "talk.mp4.parts"]
    monkeypatch.setattr(assemble_mod, "verify_output", real_verify)
    # --force replaces it, reusing what was rendered.
    forced = runner.invoke(app, ["gen", str(media["speech6"]), str(media["portrait"]),
                                 "-o", str(out), *SMALL, "--force", "--json"])
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.stdout)["batches_rendered"] == []
    assert m.video_frames(out) == 150


# -- 2. deep images are scaled, not clipped ---------------------------------------------------


def _png_16bit_grey(path: Path) -> Path:
    from PIL import Image

    ramp = np.linspace(0, 65535, 128 * 128).reshape(128, 128).astype(np.uint16)
    Image.fromarray(ramp).save(path)  # mode I;16
    return path


def _png_48bit(path: Path) -> Path:
    import cv2

    ramp = np.linspace(0, 65535, 128 * 128).reshape(128, 128).astype(np.uint16)
    cv2.imwrite(str(path), np.stack([ramp // 3, ramp // 2, ramp], axis=-1))  # BGR, 16 bit
    return path


@pytest.mark.parametrize(("make", "mean_rgb"), [
    (_png_16bit_grey, (127.5, 127.5, 127.5)),
    (_png_48bit, (127.5, 63.75, 42.5)),
])
def test_16_bit_images_keep_their_tones(tmp_path: Path, make: Any,
                                        mean_rgb: tuple[float, float, float]) -> None:
    rgb = portrait.load(make(tmp_path / "deep.png"))
    assert rgb.dtype == np.uint8
    # A ramp from black to white: mid-grey on average, black and white at its ends.
    assert rgb.reshape(-1, 3).mean(axis=0) == pytest.approx(mean_rgb, abs=1.5)
    assert rgb[0, 0].max() <= 1 and rgb[-1, -1].max() >= 254


# -- 3. a part replaced by another valid video is rendered again ------------------------------


def test_a_part_swapped_for_another_jobs_part_is_rendered_again(media: dict[str, Path],
                                                                tmp_path: Path) -> None:
    args = ["gen", str(media["speech6"]), str(media["portrait"]), *SMALL, "--keep-parts"]
    mine, other = tmp_path / "mine.mp4", tmp_path / "other.mp4"
    assert runner.invoke(app, [*args, "-o", str(mine)]).exit_code == 0
    # Another job: same length, size and fps; other pixels (another seed).
    assert runner.invoke(app, [*args, "-o", str(other), "--set", "seed=7"]).exit_code == 0
    part = Path("parts") / "part-0000.mp4"
    mine_part, other_part = tmp_path / "mine.mp4.parts" / part, tmp_path / "other.mp4.parts" / part
    assert mine_part.read_bytes() != other_part.read_bytes()
    manifest = json.loads((tmp_path / "mine.mp4.parts" / "manifest.json").read_text())
    assert len(manifest["parts"][0]["sha256"]) == 64
    shutil.copyfile(other_part, mine_part)
    mine.unlink()
    rerun = runner.invoke(app, [*args, "-o", str(mine), "--json"])
    assert rerun.exit_code == 0, rerun.output
    summary = json.loads(rerun.stdout)
    assert summary["batches_rendered"] == [0] and summary["batches_reused"] == []
    assert "damaged or missing" in rerun.stderr


# -- 6. a damaged job record is refused clearly, and --force starts over ----------------------


def _edit(data: dict[str, Any], path: str, value: Any) -> None:
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    for k in keys[:-1]:
        data = data[k]
    data[keys[-1]] = value


MANIFEST_EDITS = [
    ("parts.0.index", "0"),
    ("parts.0.attempts", "many"),
    ("parts.0.state", "finished-ish"),
    ("plan.frames", 1e30),
    ("plan.width", -256),
    ("plan.batches.0.frame_end", 10**12),
    ("plan.fps", "25"),
    ("inputs.audio.path", 5),
    ("face", "middle"),
    ("preset.values.fps", 1000),  # well-typed but not what the job's key stands for
    ("parts", []),
    ("parts.0.telemetry", {"wall_s": "slow"}),
]


def test_a_hand_edited_job_record_is_refused_and_force_starts_over(media: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "short.mp4"
    args = ["gen", str(media["speech6"]), str(media["portrait"]), "-o", str(out), *SMALL,
            "--keep-parts"]
    assert runner.invoke(app, args).exit_code == 0
    out.unlink()
    manifest = tmp_path / "short.mp4.parts" / "manifest.json"
    original = manifest.read_text()
    for path, value in MANIFEST_EDITS:
        data = json.loads(original)
        _edit(data, path, value)
        manifest.write_text(json.dumps(data))
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (path, result.output)
        assert "job manifest is damaged" in result.output and "--force" in result.output, path
        assert len(error_lines(result.output)) == 1, (path, result.output)
        assert not out.exists(), path
    data = json.loads(original)
    _edit(data, "plan.frames", 1e30)
    manifest.write_text(json.dumps(data))
    forced = runner.invoke(app, [*args, "--force", "--json"])
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.stdout)["batches_rendered"] == [0]
    assert m.video_frames(out) == 150


# -- 7. audio that starts late in its container: one timeline everywhere ----------------------


def test_audio_that_starts_late_in_a_video_renders_in_sync(media: dict[str, Path],
                                                           tmp_path: Path) -> None:
    late = tmp_path / "late.mp4"
    ffmpeg_bin.run(["-v", "error", "-y", "-f", "lavfi", "-i", "color=c=gray:s=64x64:r=25:d=6.5",
                "-itsoffset", "0.5", "-i", str(media["speech6"]), "-map", "0:v", "-map", "1:a",
                "-c:v", "libx264", "-c:a", "aac", "-shortest", str(late)])
    out = tmp_path / "talk.mp4"
    result = runner.invoke(app, ["gen", str(late), str(media["portrait"]), "-o", str(out),
                                 *SMALL, "--json"])
    assert result.exit_code == 0, result.output
    frames = json.loads(result.stdout)["frames"]
    # The half second of silence before the speech is part of the video, as a player has it.
    assert frames >= 160
    assert m.video_frames(out) == frames
    assert abs(m.audio_seconds(out) - frames / 25) <= 1 / 25


# -- 8. a closed or broken stdout is not an error of the job ----------------------------------


def test_a_reader_that_goes_away_does_not_fail_the_job(media: dict[str, Path],
                                                        tmp_path: Path) -> None:
    out = tmp_path / "piped.mp4"
    proc = subprocess.Popen([sys.executable, "-m", "avatarcli", "gen", str(media["speech6"]),
                             str(media["portrait"]), "-o", str(out), *SMALL, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # `| head -0`: nobody reads what it prints
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, stderr
    assert "error" not in stderr.lower()
    assert m.video_frames(out) == 150


def test_a_closed_stdout_is_not_an_error(media: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "closed.mp4"
    run = avatar("gen", str(media["speech6"]), str(media["portrait"]), "-o", str(out), *SMALL,
                 "--keep-parts", preexec_fn=lambda: os.close(1))  # `>&-`
    assert run.returncode == 0, run.stderr
    assert m.video_frames(out) == 150
    # Nothing we print ended up in a file that took over fd 1 (the lock, the manifest).
    json.loads((tmp_path / "closed.mp4.parts" / "manifest.json").read_text())
    assert b"wrote" not in (tmp_path / "closed.mp4.parts" / "lock").read_bytes()


# -- 9. disk full is the environment's problem; the job stays resumable -----------------------


def test_disk_full_while_saving_the_job_exits_74_and_resumes(
        media: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import avatarcli.job as job_mod

    real = job_mod.write_json_atomic
    calls = {"n": 0}

    def fills_up(path: Path, data: Any) -> None:
        calls["n"] += 1
        if calls["n"] >= 3:  # the job exists, a batch has started
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(job_mod, "write_json_atomic", fills_up)
    out = tmp_path / "full.mp4"
    args = ["gen", str(media["speech6"]), str(media["portrait"]), "-o", str(out), *SMALL]
    result = runner.invoke(app, args)
    assert result.exit_code == 74, result.output
    lines = error_lines(result.output)
    assert len(lines) == 1 and "No space left on device" in lines[0], result.output
    assert "manifest.json" in lines[0] and "Traceback" not in result.output
    assert not out.exists()
    monkeypatch.setattr(job_mod, "write_json_atomic", real)
    assert runner.invoke(app, args).exit_code == 0
    assert m.video_frames(out) == 150


@pytest.fixture(params=["200k", "400k"])  # full while preparing the job; while encoding a part
def small_disk(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A real, small filesystem (tmpfs); skipped where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={request.param}", "tmpfs",
                           str(disk)],
                          capture_output=True, check=False)
    if made.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_really_full_disk_exits_74_with_one_line(media: dict[str, Path],
                                                   small_disk: Path) -> None:
    out = small_disk / "talk.mp4"
    run = avatar("gen", str(media["speech6"]), str(media["portrait"]), "-o", str(out), *SMALL)
    assert run.returncode == 74, run.stderr
    assert len(error_lines(run.stderr)) == 1, run.stderr
    assert "No space left on device" in run.stderr and "Traceback" not in run.stderr
    assert not out.exists()


# -- 10. SIGKILL during assembly: no leftovers beside the output, no ffmpeg left running ------


def test_sigkill_during_assembly_leaves_nothing_running_or_behind(media: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    marker = tmp_path / "assembling.pid"
    # The concat (assembly) call hangs, as a long join would; every other call is ffmpeg.
    wrapper = ffmpeg_wrapper(tmp_path / "slow-ffmpeg", "*concat*",
                             f"echo $$ > '{marker}'; exec sleep 300")
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "talk.mp4"
    args = ["gen", str(media["speech6"]), str(media["portrait"]), "-o", str(out), *SMALL]
    proc = subprocess.Popen([sys.executable, "-m", "avatarcli", *args],
                            env={**os.environ, "FFMPEG_BINARY": str(wrapper)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (marker.is_file() and marker.read_text().strip()):
        assert proc.poll() is None, "avatar exited before assembling"
        assert time.monotonic() < deadline, "assembly never started"
        time.sleep(0.05)
    child = int(marker.read_text())
    proc.kill()
    proc.wait(timeout=30)
    try:
        assert gone(child), "the assembling ffmpeg outlived its parent"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, 9)  # only if the assertion failed: never leave it running
    assert sorted(p.name for p in outdir.iterdir()) == ["talk.mp4.parts"]
    rerun = avatar(*args, "--json")
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["batches_reused"] == [0]
    assert sorted(p.name for p in outdir.iterdir()) == ["talk.mp4"]


# -- 12. with stderr closed, stdout still carries only the JSON -------------------------------


def test_closed_stderr_keeps_json_alone_on_stdout(media: dict[str, Path],
                                                  tmp_path: Path) -> None:
    # Silence makes a warning; with stderr closed it must go nowhere rather than to stdout.
    run = avatar("gen", str(media["silence_wav"]), str(media["portrait"]),
                 "-o", str(tmp_path / "x.mp4"), "--dry-run", "--json",
                 preexec_fn=lambda: os.close(2))
    assert run.returncode == 0
    data = json.loads(run.stdout)
    assert data["dry_run"] is True and any("silence" in w for w in data["warnings"])


# -- 5, 11, 13. one table: bad input exits 2, the environment 74, never 70 ---------------------


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width x height pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def _alias_bomb(levels: int = 6) -> str:
    """Nested YAML aliases: 10**levels strings from a few hundred bytes."""
    items = ["&a0 [" + ", ".join(["lol"] * 10) + "]"]
    for k in range(1, levels):
        items.append(f"&a{k} [" + ", ".join([f"*a{k - 1}"] * 10) + "]")
    return "[" + ", ".join(items) + "]"


def _fake_ffmpeg(folder: Path, name: str, on_decode: str) -> Path:
    """ffmpeg that does `on_decode` (a shell command) when asked to decode audio to PCM."""
    return ffmpeg_wrapper(folder / name, "*f32le*", on_decode)


def _table(media: dict[str, Path], tmp: Path) -> list[tuple[str, list[str], dict[str, str], int,
                                                            str]]:
    """(name, args, environment, exit code, pattern of the one error line)."""
    speech, face = str(media["speech6"]), str(media["portrait"])
    out = str(tmp / "out.mp4")
    setup = tmp / "setup"
    setup.mkdir()
    loop = setup / "loop.mp4"
    loop.symlink_to(loop)
    not_utf8 = setup / os.fsdecode(b"caf\xe9.wav")
    shutil.copyfile(speech, not_utf8)
    other_job = setup / "other.mp4.parts"
    other_job.mkdir()
    (other_job / "manifest.json").write_text("{}")
    (other_job / "lock").write_text("")
    shutil.copyfile(speech, other_job / "in-job.wav")
    (setup / "blocked.mp4.parts").write_text("a file where the job folder goes")
    bomb_png = _png_header_only(setup / "bomb.png", 40_000, 40_000)
    bomb_preset = setup / "bomb.yaml"
    bomb_preset.write_text(f"description: {_alias_bomb()}\n")
    binary_preset = setup / "binary.yaml"
    binary_preset.write_bytes(bytes(range(256)) * 4)

    def manifest(name: str, data: bytes) -> str:
        path = setup / name
        path.write_bytes(data)
        return str(path)

    row = f"{speech},{face}".encode()
    long_name = "x" * 250 + ".mp4"
    no_ffmpeg = {"FFMPEG_BINARY": "/bin/false"}
    oom = {"FFMPEG_BINARY": str(_fake_ffmpeg(setup, "oom-ffmpeg", "kill -9 $$"))}
    return [
        # 11: bad input reported as a bug
        ("decompression bomb", ["gen", speech, str(bomb_png), "-o", out], {}, 2,
         r"bomb.png: image is too large"),
        ("output symlink loop", ["gen", speech, face, "-o", str(loop)], {}, 2,
         r"loop.mp4: output path cannot be used \(Too many levels of symbolic links\)"),
        ("audio symlink loop", ["gen", str(loop), face, "-o", out], {}, 2,
         r"loop.mp4: audio path cannot be used"),
        ("name not UTF-8", ["gen", str(not_utf8), face, "-o", out], {}, 2,
         r"caf\\udce9.wav: audio path is not valid UTF-8"),
        ("audio name too long", ["gen", str(tmp / ("y" * 300 + ".wav")), face, "-o", out], {},
         2, r"y.wav: audio path cannot be used \(File name too long\)"),
        ("output name too long", ["gen", speech, face, "-o", str(tmp / long_name)], {}, 2,
         r"output file name is too long"),
        ("job folder is a file", ["gen", speech, face, "-o", str(setup / "blocked.mp4")], {},
         2, r"blocked.mp4.parts: the job folder of blocked.mp4 exists but is not a folder"),
        ("face outside the image", ["gen", speech, face, "-o", out, "--face", "300,300,200,200"],
         {}, 2, r"--face 300,300,200,200: the box lies outside the image .* \(384x384 px\)"),
        ("csv with NUL", ["batch", manifest("nul.csv", b"audio,image\n" + row + b"\0\n")], {},
         2, r"nul.csv:2: not a text manifest \(it contains a NUL byte\)"),
        ("csv giant field", ["batch", manifest("giant.csv", b"audio,image\n" + row + b',"'
                                                + b"x" * 200_000 + b'"\n')], {}, 2,
         r"giant.csv:\d+: not a readable CSV row .*field larger than field limit"),
        ("yaml set: 5", ["batch", manifest("set5.yaml", b"- {audio: " + speech.encode()
                                           + b", image: " + face.encode() + b", set: 5}\n")],
         {}, 2, r"set5.yaml: row 1: 'set' must be a mapping"),
        ("binary preset", ["gen", speech, face, "-o", out, "-p", str(binary_preset)], {}, 2,
         r"binary.yaml: not a preset \(not UTF-8 text\)"),
        # 4: outputs and inputs inside another job's folder
        ("output in a job folder", ["gen", speech, face, "-o", str(other_job / "x.mp4")], {}, 2,
         r"x.mp4: output lies inside the job folder .*other.mp4.parts"),
        ("input in a job folder", ["gen", str(other_job / "in-job.wav"), face, "-o", out], {},
         2, r"in-job.wav: audio file lies inside the job folder"),
        ("batch output in a job folder",
         ["batch", manifest("injob.csv", b"audio,image,output\n" + row + b","
                            + os.fsencode(other_job / "y.mp4") + b"\n")], {}, 1,
         r"y.mp4: output lies inside the job folder"),
        # 5: YAML alias bombs
        ("preset alias bomb", ["gen", speech, face, "-o", out, "-p", str(bomb_preset)], {}, 2,
         r"bomb.yaml: YAML expands to more than \d+ values"),
        ("manifest alias bomb", ["batch", manifest("bomb-rows.yaml",
                                                   f"- {_alias_bomb()}\n".encode())], {}, 2,
         r"bomb-rows.yaml: YAML expands to more than \d+ values"),
        # 13: the environment, not the input
        ("ffmpeg broken", ["gen", speech, face, "-o", out], no_ffmpeg, 74,
         r"FFMPEG_BINARY=/bin/false: not a working ffmpeg"),
        ("batch with a broken ffmpeg",
         ["batch", manifest("ok.csv", b"audio,image,output\n" + row + b","
                            + os.fsencode(tmp / "row.mp4") + b"\n")], no_ffmpeg, 74,
         r"FFMPEG_BINARY=/bin/false: not a working ffmpeg"),
        ("set value alias bomb", ["gen", speech, face, "-o", out, "--set",
                                  f"description={_alias_bomb()}"], {}, 2,
         r"--set description: YAML expands to more than \d+ values"),
        ("ffmpeg killed while decoding", ["gen", speech, face, "-o", out], oom, 74,
         r"ffmpeg was killed by signal 9 .*not of the input"),
        ("log file on a full disk", ["gen", speech, face, "-o", out, "--log-file", "/dev/full"],
         {}, 74, r"/dev/full: cannot write the log file \(No space left on device\)"),
    ]


def _case_problem(result: Any, code: int, pattern: str) -> str | None:
    if result.exit_code != code:
        return f"exit {result.exit_code}, expected {code}: {result.output[:300]}"
    if "Traceback" in result.output or "internal error" in result.output:
        return f"reported as a bug: {result.output[:300]}"
    if not re.search(pattern, result.output):
        return f"no line matching {pattern!r}: {result.output[:300]}"
    if code != 1 and len(error_lines(result.output)) != 1:  # a batch prints its table too
        return f"not one error line: {result.output[:300]}"
    if len(result.output) >= 2000:
        return f"{len(result.output)} characters of output"
    return None


def test_bad_input_exits_2_and_the_environment_74_never_70(media: dict[str, Path],
                                                            tmp_path: Path) -> None:
    cases = _table(media, tmp_path)
    assert len(cases) >= 19
    before = listing(tmp_path)
    media_before = listing(media["speech6"].parent)
    wrong = []
    for name, args, env, code, pattern in cases:
        if name == "log file on a full disk" and not Path("/dev/full").exists():
            continue
        ffmpeg_bin.ffmpeg_exe.cache_clear()
        result = runner.invoke(app, args, env=env)
        ffmpeg_bin.ffmpeg_exe.cache_clear()
        problem = _case_problem(result, code, pattern)
        if problem is None and listing(tmp_path) != before:
            problem = "created or changed files"
        if problem is not None:
            wrong.append(f"{name}: {problem}")
        for path in set(listing(tmp_path)) - set(before):  # the next case starts clean
            with contextlib.suppress(OSError):
                p = Path(path)
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    assert wrong == [], "\n".join(wrong)
    assert listing(media["speech6"].parent) == media_before


def test_presets_lists_a_broken_user_preset_without_hanging(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            ) -> None:
    user = tmp_path / "presets"
    user.mkdir()
    (user / "bomb.yaml").write_text(f"description: {_alias_bomb()}\n")
    (user / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    os.mkfifo(user / "fifo.yaml")  # reading it would wait for a writer forever
    with open(user / "huge.yaml", "wb") as f:
        f.truncate(2 << 20)
    monkeypatch.setenv("AVATARCLI_PRESETS_DIR", str(user))
    result = runner.invoke(app, ["presets"])
    assert result.exit_code == 0, result.output[:500]
    assert "cpu-preview" in result.output
    lines = {ln.split()[0]: ln for ln in result.output.splitlines() if ln.strip()}
    assert "YAML expands to more than" in lines["bomb"]
    assert "not UTF-8 text" in lines["binary"]
    assert "not a preset (over 1 MiB)" in lines["huge"]
    assert "fifo" not in lines
    assert len(result.output) < 5000


@pytest.fixture
def read_only_job(tmp_path: Path) -> Iterator[Path]:
    """A job folder on a read-only mount; skipped where bind mounts are not allowed."""
    job = tmp_path / "ro.mp4.parts"
    job.mkdir()
    (job / "manifest.json").write_text("{}")
    made = subprocess.run(["mount", "--bind", "-o", "ro", str(job), str(job)],
                          capture_output=True, check=False)
    if made.returncode != 0:
        pytest.skip("cannot bind-mount read-only here (needs root)")
    subprocess.run(["mount", "-o", "remount,ro,bind", str(job)], capture_output=True,
                   check=False)
    try:
        with contextlib.suppress(OSError):
            (job / "probe").write_text("")
            pytest.skip("the read-only mount is writable here")
        yield job
    finally:
        subprocess.run(["umount", "-l", str(job)], check=False)


def test_read_only_job_folder_is_the_environment(media: dict[str, Path], tmp_path: Path,
                                                 read_only_job: Path) -> None:
    before = listing(tmp_path)
    result = runner.invoke(app, ["gen", str(media["speech6"]), str(media["portrait"]),
                                 "-o", str(tmp_path / "ro.mp4")])
    assert result.exit_code == 74, result.output
    lines = error_lines(result.output)
    assert len(lines) == 1 and "Read-only file system" in lines[0], result.output
    assert "ro.mp4.parts" in lines[0]
    assert listing(tmp_path) == before



@pytest.mark.parametrize("links", [True, False])
def test_publishing_never_replaces_a_file_that_is_there(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        links: bool) -> None:
    from avatarcli.errors import InputError
    from avatarcli.media.assemble import publish

    if not links:  # a filesystem without hard links (some FUSE and SMB mounts)
        def no_link(src: object, dst: object) -> None:
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))

        monkeypatch.setattr(os, "link", no_link)
    out = tmp_path / "out.mp4"
    tmp = tmp_path / "ours.tmp"
    tmp.write_bytes(b"ours")
    out.write_bytes(b"theirs")
    with pytest.raises(InputError, match="appeared while the job was rendering"):
        publish(tmp, out, overwrite=False)
    assert out.read_bytes() == b"theirs" and tmp.read_bytes() == b"ours"
    out.unlink()
    publish(tmp, out, overwrite=False)
    assert out.read_bytes() == b"ours" and not tmp.exists()


def test_the_host_out_of_memory_is_the_environment(media: dict[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import avatarcli.cli as cli

    def no_memory(*args: object, **kwargs: object) -> None:
        raise MemoryError

    monkeypatch.setattr(cli.gen, "generate", no_memory)
    result = runner.invoke(app, ["gen", str(media["speech6"]), str(media["portrait"]),
                                 "-o", str(tmp_path / "x.mp4")])
    assert result.exit_code == 74, result.output
    lines = error_lines(result.output)
    assert len(lines) == 1 and "ran out of memory" in lines[0] and "not of the input" in lines[0]
