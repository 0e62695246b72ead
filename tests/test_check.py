"""`avatar check`: lip-sync offset, length, frozen and black frames, on built-in renders and
videos damaged on purpose (ffmpeg filters), through the core API and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import fixtures
import numpy as np
import pytest
from typer.testing import CliRunner

from avatarcli import check, presets
from avatarcli.cli import app
from avatarcli.media import ffmpeg_bin
from avatarcli.pipeline import generate

FPS = 25


@pytest.fixture(scope="module")
def render(media: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 s of speech by the built-in engine at 256x256: in sync by construction."""
    out = tmp_path_factory.mktemp("check") / "talk.mp4"
    resolved = presets.resolve(None, presets.parse_set(["size=256*256"]))
    generate(media["speech6"], media["portrait"], resolved, output=out)
    return out


def shifted_wav(src: Path, dst: Path, frames: int) -> Path:
    """`src` delayed by `frames` video frames (negative: advanced), same length."""
    samples, rate = fixtures.read_wav(src)
    n = round(frames * rate / FPS)
    out = np.zeros_like(samples)
    if n >= 0:
        out[n:] = samples[: len(samples) - n]
    else:
        out[:n] = samples[-n:]
    return fixtures.write_wav(dst, out, rate)


def remux(video: Path, dst: Path, *vf: str, audio: Path | None = None,
          video_s: float | None = None) -> Path:
    """A copy of `video` re-encoded through filter `vf`, with `audio` (default its own)."""
    args = ["-v", "error", "-y", *(["-t", f"{video_s}"] if video_s else []), "-i", str(video)]
    args += ["-i", str(audio or video)]
    if vf:
        args += ["-filter_complex", f"[0:v:0]{';'.join(vf)}[v]", "-map", "[v]",
                 "-c:v", "libx264", "-preset", "ultrafast", "-crf", "18", "-pix_fmt", "yuv420p"]
    else:
        args += ["-map", "0:v:0", "-c:v", "copy"]
    args += ["-map", "1:a:0"]
    args += ["-c:a", "aac", str(dst)]
    ffmpeg_bin.run(args)
    return dst


@pytest.mark.parametrize("k", range(-6, 7))
def test_lag_is_found_for_audio_shifted_by_k_frames(render: Path, media: dict[str, Path],
                                                     tmp_path: Path, k: int) -> None:
    # Audio delayed by k frames: the picture is k frames early, so the lag is -k.
    wav = shifted_wav(media["speech6"], tmp_path / f"shift{k}.wav", k)
    report = check.check(render, wav)
    sync = report.items["sync"]
    assert sync.figures["lag_frames"] is not None, sync.detail
    assert abs(sync.figures["lag_frames"] - (-k)) <= 1, sync.detail
    assert sync.figures["lag_ms"] == pytest.approx(sync.figures["lag_frames"] * 40.0)
    assert sync.figures["corr"] >= 0.5
    assert sync.ok is (abs(sync.figures["lag_frames"]) <= 1)


def test_in_sync_render_passes_every_check(render: Path) -> None:
    result = CliRunner().invoke(app, ["check", str(render), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["failed"] == []
    checks = report["checks"]
    assert checks["sync"]["figures"]["lag_frames"] == 0
    assert checks["length"]["ok"] and checks["frames"]["figures"]["decoded"] == 150
    assert checks["frozen"]["ok"] and checks["black"]["figures"]["black_frames"] == 0
    # gen wrote where parts join (one part here: none) and how much they overlap.
    assert checks["seams"]["figures"]["overlap_frames"] == 0


def test_the_videos_own_track_is_the_default_audio(render: Path, media: dict[str, Path],
                                                   tmp_path: Path) -> None:
    late = remux(render, tmp_path / "late.mp4",
                 audio=shifted_wav(media["speech6"], tmp_path / "late.wav", 4))
    result = CliRunner().invoke(app, ["check", str(late), "--json"])
    assert result.exit_code == check.EXIT_FAILED == 5, result.output
    report = json.loads(result.stdout)
    assert report["failed"] == ["sync"]
    assert report["checks"]["sync"]["figures"]["lag_frames"] in (-5, -4, -3)
    # A looser threshold is an option: the same video then passes.
    loose = CliRunner().invoke(app, ["check", str(late), "--max-offset", "6"])
    assert loose.exit_code == 0, loose.output
    assert "picture early" in loose.output


def test_static_portrait_with_speech_is_not_called_in_sync(media: dict[str, Path],
                                                           tmp_path: Path) -> None:
    still = tmp_path / "still.mp4"
    ffmpeg_bin.run(["-v", "error", "-y", "-loop", "1", "-framerate", str(FPS),
                "-i", str(media["portrait"]), "-i", str(media["speech6"]), "-t", "6",
                "-vf", "scale=256:256", "-c:v", "libx264", "-preset", "ultrafast",
                "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(still)])
    report = check.check(still)
    sync = report.items["sync"]
    assert sync.figures["lag_frames"] is None and sync.ok is None, sync.detail
    assert "unknown" in sync.detail
    assert report.items["frozen"].ok is False  # and it is one long frozen stretch
    strict = CliRunner().invoke(app, ["check", str(still), "--require-sync",
                                      "--max-frozen", "60", "--json"])
    assert strict.exit_code == 5
    assert json.loads(strict.stdout)["failed"] == ["sync"]


def test_a_frozen_stretch_is_detected(render: Path, tmp_path: Path) -> None:
    frozen = remux(render, tmp_path / "frozen.mp4", "split[a][b];[a][b]freezeframes=first=40:last=80:replace=40")
    report = check.check(frozen)
    item = report.items["frozen"]
    assert item.ok is False
    # Frames 40-80 repeat frame 40; x264 still refines the first few of them, so the
    # measured run may start up to 5 frames late but ends exactly at frame 80.
    start, length = item.figures["longest_start"], item.figures["longest_frames"]
    assert 40 <= start <= 45 and start + length == 81, item.detail
    assert item.figures["runs_over_limit"] == [[start, 81]]
    assert report.items["length"].ok and report.items["black"].ok
    # At most 41 frames (1.64 s): a 2-second bound passes; the clean render passes the default.
    assert check.check(frozen, thresholds=check.Thresholds(max_frozen_s=2.0)).items[
        "frozen"].ok
    assert check.check(render).items["frozen"].ok


def test_black_frames_are_detected(render: Path, tmp_path: Path) -> None:
    dark = remux(render, tmp_path / "black.mp4",
                 "drawbox=x=0:y=0:w=iw:h=ih:color=black:t=fill:enable='between(n,60,64)'")
    result = CliRunner().invoke(app, ["check", str(dark), "--json"])
    assert result.exit_code == 5, result.output
    black = json.loads(result.stdout)["checks"]["black"]
    assert black["ok"] is False
    assert black["figures"]["black_frames"] == 5 and black["figures"]["spans"] == [[60, 65]]
    allowed = CliRunner().invoke(app, ["check", str(dark), "--max-black", "5"])
    assert "black" not in allowed.output.split("failed:")[-1]


def test_a_truncated_video_is_detected(render: Path, tmp_path: Path) -> None:
    # The picture stops at 4 s while the sound goes on to 6 s.
    short = remux(render, tmp_path / "short.mp4", video_s=4.0)
    report = check.check(short)
    assert report.items["length"].ok is False
    assert report.items["length"].figures["delta_frames"] == pytest.approx(-50, abs=1)
    # A file cut off mid-way (the index at the front survives, the frames do not).
    data = render.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 2 // 3])
    report = check.check(cut)
    assert report.items["frames"].ok is False
    assert report.items["frames"].figures["decoded"] < 140
    assert not report.ok


def test_bad_input_is_one_line_and_exit_2(media: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    for path, problem in ((tmp_path / "nope.mp4", "video file not found"),
                          (media["speech6"], "no video stream"),
                          (media["portrait"], "an image, not a video")):
        result = runner.invoke(app, ["check", str(path)])
        assert result.exit_code == 2, result.output
        assert result.stderr.strip().splitlines() == [f"avatar: error: {path}: {problem}"]


def test_seam_tag_round_trip() -> None:
    assert check.parse_seam_tag(check.seam_tag([150, 300], 8)) == ([150, 300], 8)
    assert check.parse_seam_tag(check.seam_tag([], 0)) == ([], 0)
    assert check.parse_seam_tag("a home video") is None


def test_a_render_that_talks_most_of_the_time_is_in_sync(media: dict[str, Path],
                                                         tmp_path: Path) -> None:
    # The demo's speech: three sentences with short pauses, the mouth open most of the time
    # (a "resting look" taken as the median frame would be an open mouth here).
    from avatarcli import demo

    speech = demo.demo_speech(tmp_path / "demo.wav")
    out = tmp_path / "demo.mp4"
    resolved = presets.resolve(None, presets.parse_set(["size=256*256"]))
    generate(speech, media["portrait"], resolved, output=out)
    report = check.check(out)
    sync = report.items["sync"].figures
    assert sync["lag_frames"] == 0 and sync["corr"] >= 0.7, report.items["sync"].detail
    assert report.ok, report.lines()
