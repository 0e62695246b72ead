"""`avatar batch`: manifests, skipping current outputs, failures that do not stop the rest."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from avatarcli.cli import app
from avatarcli.media import streams as m

runner = CliRunner()


@pytest.fixture
def work(media: dict[str, Path], tmp_path: Path) -> Path:
    """A folder with two short recordings and a portrait, as a user would have it."""
    for name in ("a.wav", "b.wav"):
        shutil.copy(media["speech6"], tmp_path / name)
    shutil.copy(media["portrait"], tmp_path / "face.png")
    (tmp_path / "out").mkdir()
    return tmp_path


def avatar(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "avatarcli", *args], capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_csv_batch_goes_on_past_a_bad_row_and_skips_on_rerun(work: Path) -> None:
    manifest = work / "lessons.csv"
    manifest.write_text(
        "audio,image,output,set\n"
        "a.wav,face.png,out/a.mp4,size=256*256\n"
        "missing.wav,face.png,out/m.mp4,size=256*256\n"
        "b.wav,face.png,out/b.mp4,size=256*256;seed=7\n")
    log_file = work / "avatar.log"
    first = avatar("batch", str(manifest), "--json", "--log-file", str(log_file))
    assert first.returncode == 1, first.stderr
    data = json.loads(first.stdout)
    assert [r["status"] for r in data["rows"]] == ["done", "failed", "done"]
    assert "missing.wav: audio file not found" in data["rows"][1]["reason"]
    assert data["rows"][1]["where"].endswith("lessons.csv:3")
    # The bad row was reported before anything rendered.
    assert first.stderr.index("lessons.csv:3") < first.stderr.index("done: ")
    for name in ("a", "b"):
        assert m.video_frames(work / "out" / f"{name}.mp4") == 150
    entries = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert {e.get("status") for e in entries if e.get("event") == "row"} == {"done", "failed"}

    (work / "missing.wav").write_bytes((work / "a.wav").read_bytes())
    second = avatar("batch", str(manifest), "--json")
    assert second.returncode == 0, second.stderr
    assert [r["status"] for r in json.loads(second.stdout)["rows"]] == ["skipped", "done",
                                                                       "skipped"]


@pytest.mark.slow
def test_yaml_manifest_with_redo_and_stale_output(work: Path) -> None:
    manifest = work / "rows.yaml"
    manifest.write_text(
        "rows:\n"
        "  - {audio: a.wav, image: face.png, output: out/a.mp4, set: {size: 256*256}}\n")
    assert avatar("batch", str(manifest), "-q").returncode == 0
    stamp = (work / "out" / "a.mp4").stat().st_mtime_ns
    skipped = avatar("batch", str(manifest), "--json")
    assert json.loads(skipped.stdout)["rows"][0]["status"] == "skipped"
    # Other settings: the old output is not "current"; without --redo it is left alone.
    stale = avatar("batch", str(manifest), "--set", "seed=9", "--json")
    assert stale.returncode == 1
    assert "--redo" in json.loads(stale.stdout)["rows"][0]["reason"]
    assert (work / "out" / "a.mp4").stat().st_mtime_ns == stamp
    redo = avatar("batch", str(manifest), "--set", "seed=9", "--redo", "--json")
    assert redo.returncode == 0, redo.stderr
    assert json.loads(redo.stdout)["rows"][0]["status"] == "done"
    assert (work / "out" / "a.mp4").stat().st_mtime_ns != stamp


@pytest.mark.parametrize(("content", "suffix", "pattern"), [
    ("audio,image,outptu\na.wav,face.png,x.mp4\n", ".csv", r"unknown column 'outptu'; did you mean 'output'"),
    ("image\nface.png\n", ".csv", r"needs an 'audio' column"),
    ("audio,image\n", ".csv", r"manifest has no rows"),
    ("- [a.wav\n", ".yaml", r"rows.yaml:\d+: YAML syntax error"),
    ("audio: a.wav\n", ".yaml", r"a manifest is a list of rows"),
    ("- {audio: a.wav, image: face.png, colour: red}\n", ".yaml", r"unknown key 'colour'"),
])
def test_bad_manifests_exit_2(work: Path, content: str, suffix: str, pattern: str) -> None:
    manifest = work / f"rows{suffix}"
    manifest.write_text(content)
    before = sorted(work.rglob("*"))
    result = runner.invoke(app, ["batch", str(manifest)])
    assert result.exit_code == 2, result.output
    assert re.search(pattern, result.output), result.output
    assert "Traceback" not in result.output
    assert sorted(work.rglob("*")) == before


def test_missing_manifest(tmp_path: Path) -> None:
    result = runner.invoke(app, ["batch", str(tmp_path / "nope.csv")])
    assert result.exit_code == 2 and "nope.csv: manifest not found" in result.output


def test_invalid_rows_are_all_reported_and_fail(work: Path) -> None:
    manifest = work / "rows.csv"
    manifest.write_text("audio,image,output,preset\n"
                        "a.wav,nope.png,out/a.mp4,\n"
                        "b.wav,face.png,out/b.mp4,nosuchpreset\n"
                        "a.wav,face.png,nowhere/c.mp4,\n")
    result = runner.invoke(app, ["batch", str(manifest), "--json"])
    assert result.exit_code == 1
    assert "rows.csv:2: " in result.output and "nope.png: image file not found" in result.output
    assert "rows.csv:3: unknown preset 'nosuchpreset'" in result.output
    assert "rows.csv:4: " in result.output and "does not exist" in result.output
    assert list((work / "out").iterdir()) == []
