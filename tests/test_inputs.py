"""Audio and images in the forms people have them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import fixtures
import pytest
from typer.testing import CliRunner

from avatarcli.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def variants(media: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return fixtures.audio_variants(media["speech6"], tmp_path_factory.mktemp("variants"))


@pytest.mark.parametrize("kind", ["wav_f32_24k", "mp3_stereo_44k", "m4a_aac", "flac",
                                  "wav_8k_phone", "ogg_opus"])
def test_any_audio_ffmpeg_reads_is_planned_to_its_length(variants: dict[str, Path],
                                                         media: dict[str, Path],
                                                         tmp_path: Path, kind: str) -> None:
    result = runner.invoke(app, ["gen", str(variants[kind]), str(media["portrait"]),
                                 "-o", str(tmp_path / "x.mp4"), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    # Lossy codecs pad a little; the plan follows what really decodes.
    assert data["duration_s"] == pytest.approx(6.0, abs=0.08)
    assert data["frames"] in range(150, 153)


@pytest.mark.parametrize(("kind", "portrait_shape"), [
    ("jpeg", "square"), ("png_alpha", "square"), ("jpeg_exif_rotated", "tall"),
])
def test_images_follow_their_orientation(media: dict[str, Path], tmp_path: Path, kind: str,
                                         portrait_shape: str) -> None:
    result = runner.invoke(app, ["gen", str(media["speech6"]), str(media[kind]),
                                 "-o", str(tmp_path / "x.mp4"), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    w, h = data["width"], data["height"]
    assert w % 16 == 0 and h % 16 == 0 and w * h <= 512 * 512
    # EXIF orientation honoured: the stored-sideways photo comes out upright (taller than wide)
    assert (h > w) if portrait_shape == "tall" else (h == w)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["not_face", "cyclops"])
def test_no_face_warns_and_still_renders(media: dict[str, Path], tmp_path: Path,
                                         kind: str) -> None:
    out = tmp_path / "x.mp4"
    run = subprocess.run([sys.executable, "-m", "avatarcli", "gen", str(media["speech6"]),
                          str(media[kind]), "-o", str(out), "--set", "size=256*256"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "no face found" in run.stderr and "--face" in run.stderr
    assert out.stat().st_size > 0


@pytest.mark.slow
def test_face_box_by_hand(media: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "x.mp4"
    run = subprocess.run([sys.executable, "-m", "avatarcli", "gen", str(media["speech6"]),
                          str(media["not_face"]), "-o", str(out), "--set", "size=256*256",
                          "--face", "80,60,100,120", "--keep-parts"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "no face found" not in run.stderr
    manifest = json.loads((tmp_path / "x.mp4.parts" / "manifest.json").read_text())
    assert manifest["engine_state"]["layout"]["source"] == "user"
    assert manifest["face"] == [80, 60, 100, 120]  # 256x256 source fitted to 256x256
