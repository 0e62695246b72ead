"""The command line through Typer's CliRunner: exit codes, messages, nothing created on error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from avatarcli.cli import app

runner = CliRunner()


def listing(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in folder.rglob("*")}


def test_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "gen" in result.output and "presets" in result.output
    gen_help = runner.invoke(app, ["gen", "--help"])
    for flag in ("--output", "--preset", "--set", "--jobs", "--dry-run", "--force",
                 "--keep-parts", "--quiet", "--json", "--face"):
        assert flag in gen_help.output


def test_presets_list_and_show() -> None:
    result = runner.invoke(app, ["presets"])
    assert result.exit_code == 0
    assert "cpu-preview" in result.output and "liveavatar-80gb" in result.output
    assert "built-in" in result.output
    shown = runner.invoke(app, ["presets", "show", "liveavatar-48gb-fp8"])
    assert shown.exit_code == 0
    assert "fp8: true" in shown.output and "engine: liveavatar" in shown.output
    missing = runner.invoke(app, ["presets", "show", "nope"])
    assert missing.exit_code == 2
    assert "unknown preset 'nope'" in missing.output and "cpu-preview" in missing.output


def _bad_cases(media: dict[str, Path], tmp: Path) -> list[tuple[str, list[str], str]]:
    speech, face = str(media["speech6"]), str(media["portrait"])
    out = str(tmp / "out.mp4")
    existing = tmp / "existing.mp4"
    existing.write_bytes(b"keep me")
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("size: [512\n")
    return [
        ("missing audio", [str(tmp / "nope.wav"), face, "-o", out], r"nope.wav: audio file not found"),
        ("missing image", [speech, str(tmp / "nope.png"), "-o", out], r"nope.png: image file not found"),
        ("jpeg named wav", [str(media["jpeg_named_wav"]), face, "-o", out], r"not an audio file"),
        ("zero-length audio", [str(media["empty_wav"]), face, "-o", out], r"zero length|no audio"),
        ("video without audio", [str(media["video_no_audio"]), face, "-o", out], r"video file with no audio stream"),
        ("text named png", [speech, str(media["text_named_png"]), "-o", out], r"not an image"),
        ("tiny image", [speech, str(media["tiny"]), "-o", out], r"at least 64 px"),
        ("missing output folder", [speech, face, "-o", str(tmp / "no" / "x.mp4")], r"output folder .* does not exist"),
        ("existing output", [speech, face, "-o", str(existing)], r"output exists \(use --force"),
        ("unknown preset", [speech, face, "-o", out, "-p", "nope"], r"unknown preset 'nope'.*available: cpu-preview"),
        ("unknown key", [speech, face, "-o", out, "--set", "infer_frame=4"], r"did you mean 'infer_frames'"),
        ("out of range", [speech, face, "-o", out, "--set", "fps=0"], r"fps must be within \[1, 120\], got 0"),
        ("wrong type", [speech, face, "-o", out, "--set", "offload=maybe"], r"offload must be true or false"),
        ("yaml syntax", [speech, face, "-o", out, "-p", str(bad_yaml)], r"bad.yaml:2: YAML syntax error"),
        ("bad face box", [speech, face, "-o", out, "--face", "1,2,3"], r"--face '1,2,3': expected X,Y,W,H"),
        ("jobs zero", [speech, face, "-o", out, "--jobs", "0"], r"--jobs"),
        ("unknown executor", [speech, face, "-o", out, "--executor", "slurm"], r"--executor 'slurm': expected local or ray"),
    ]


def _bad_batch_cases(media: dict[str, Path], tmp: Path) -> list[tuple[str, list[str], str]]:
    def manifest(name: str, text: str) -> str:
        path = tmp / name
        path.write_text(text)
        return str(path)

    row = f"{media['speech6']},{media['portrait']}"
    return [
        ("missing manifest", [str(tmp / "nope.csv")], r"nope.csv: manifest not found"),
        ("unknown column", [manifest("col.csv", f"audio,image,colour\n{row},red\n")], r"col.csv:1: unknown column 'colour'"),
        ("no rows", [manifest("empty.csv", "audio,image\n")], r"empty.csv: manifest has no rows"),
        ("yaml syntax", [manifest("bad.yaml", "- [a\n")], r"bad.yaml:\d+: YAML syntax error"),
        ("yaml not a list", [manifest("map.yaml", "audio: a.wav\n")], r"a manifest is a list of rows"),
        ("batch unknown preset", [manifest("ok.csv", f"audio,image\n{row}\n"), "-p", "nope"], r"unknown preset 'nope'"),
    ]


def test_bad_inputs_exit_2_with_one_clear_line(media: dict[str, Path], tmp_path: Path) -> None:
    cases = [(name, ["gen", *args], pattern) for name, args, pattern in _bad_cases(media, tmp_path)]
    cases += [(name, ["batch", *args], pattern)
              for name, args, pattern in _bad_batch_cases(media, tmp_path)]
    assert len(cases) >= 20
    before = listing(tmp_path)
    media_before = listing(media["speech6"].parent)
    import re

    for name, args, pattern in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (name, result.output)
        assert "Traceback" not in result.output, name
        assert re.search(pattern, result.output), (name, result.output)
        errors = [ln for ln in result.output.splitlines() if "error" in ln.lower()]
        assert len(errors) == 1, (name, result.output)
        assert listing(tmp_path) == before, f"{name}: created or changed files"
    assert listing(media["speech6"].parent) == media_before
    assert (tmp_path / "existing.mp4").read_bytes() == b"keep me"


def test_all_problems_are_reported_together(media: dict[str, Path], tmp_path: Path) -> None:
    result = runner.invoke(app, ["gen", str(media["jpeg_named_wav"]), str(media["tiny"]),
                                 "-o", str(tmp_path / "no" / "x.mp4")])
    assert result.exit_code == 2
    assert "not an audio file" in result.output
    assert "at least 64 px" in result.output
    assert "does not exist" in result.output


def test_dry_run_prints_plan_and_creates_nothing(media: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "talk.mp4"
    result = runner.invoke(app, ["gen", str(media["speech30"]), str(media["portrait"]),
                                 "-o", str(out), "--dry-run", "--set", "clips_per_batch=4"])
    assert result.exit_code == 0, result.output
    assert "750 frames" in result.output
    assert result.output.count("batch ") >= 3
    assert list(tmp_path.iterdir()) == []


def test_dry_run_json_is_the_only_stdout(media: dict[str, Path], tmp_path: Path) -> None:
    result = runner.invoke(app, ["gen", str(media["speech6"]), str(media["portrait"]),
                                 "-o", str(tmp_path / "x.mp4"), "--dry-run", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["frames"] == 150 and data["duration_s"] == 6.0
    assert data["plan"][0]["frame_start"] == 0 and data["plan"][-1]["frame_end"] == 150


def test_silent_audio_warns_but_plans(media: dict[str, Path], tmp_path: Path) -> None:
    result = runner.invoke(app, ["gen", str(media["silence_wav"]), str(media["portrait"]),
                                 "-o", str(tmp_path / "x.mp4"), "--dry-run"])
    assert result.exit_code == 0
    assert "silence only" in result.output


def test_default_output_is_audio_path_with_mp4(media: dict[str, Path]) -> None:
    result = runner.invoke(app, ["gen", str(media["speech6"]), str(media["portrait"]),
                                 "--dry-run", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["output"] == str(media["speech6"].with_suffix(".mp4"))


def test_unwritable_output_folder(media: dict[str, Path], tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    real_access = os.access
    # Root may write anywhere, so the folder's refusal is simulated for it.
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == folder
                        else real_access(p, mode))
    result = runner.invoke(app, ["gen", str(media["speech6"]), str(media["portrait"]),
                                 "-o", str(folder / "x.mp4")])
    assert result.exit_code == 2 and "x.mp4: output folder" in result.output
    assert "not writable" in result.output
    assert list(folder.iterdir()) == []


def test_an_unexpected_error_is_one_line_and_exit_70(media: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import avatarcli.cli as cli

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(cli.gen, "generate", broken)
    result = runner.invoke(app, ["gen", str(media["speech6"]), str(media["portrait"]),
                                 "-o", str(tmp_path / "x.mp4")])
    assert result.exit_code == 70
    assert "internal error: RuntimeError: simulated bug" in result.output
    assert "Traceback" not in result.output
