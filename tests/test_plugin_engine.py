"""An engine from a package outside avatarcli: found through the `avatarcli.engines` entry
point, its own preset section validated, and rendered by `avatar gen` (parent and batch
processes alike), with no avatarcli file touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from avatarcli.media import streams as m

pytestmark = pytest.mark.slow

AVATAR = str(Path(sys.executable).parent / "avatar")

# A plugin as a package author would write it: an options dataclass, an Engine subclass that
# paints every frame one grey level (from its own preset key) plus the global frame index in
# the first row, so frames are a pure function of their index across batches.
PLUGIN = '''
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from avatarcli.engines.base import Engine, PartTask, Progress, Resources
from avatarcli.media.streams import VideoWriter
from avatarcli.options import Preset, knob


@dataclass(frozen=True)
class FlatOptions:
    grey: int = knob(128, bounds=(0, 255), help="grey level of every frame")


class FlatEngine(Engine):
    name = "flat"
    options = FlatOptions

    @classmethod
    def validate(cls, preset: Preset) -> list[str]:
        if preset.size != "128*128":
            return [f"size must be 128*128 for the flat engine, got {preset.size!r}"]
        return []

    @classmethod
    def resources(cls, preset: Preset) -> Resources:
        return Resources(cpus=0.5, gpus=0)

    def render(self, task: PartTask, progress: Progress) -> None:
        grey = self.preset.section(FlatOptions).grey
        inputs, batch = task.inputs, task.batch
        frames = np.full((batch.frames, inputs.height, inputs.width, 3), grey, np.uint8)
        with VideoWriter(task.out, width=inputs.width, height=inputs.height,
                         fps=inputs.fps, crf=0) as writer:
            writer.write(frames)
        progress(batch.frames)
'''


@pytest.fixture
def plugin(tmp_path: Path) -> dict[str, str]:
    """The plugin installed as a distribution on PYTHONPATH (a .dist-info folder with the
    entry point, as pip would leave it): the environment to run avatar with."""
    site = tmp_path / "site"
    (site / "flatengine").mkdir(parents=True)
    (site / "flatengine" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "flatengine-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: flatengine\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[avatarcli.engines]\nflat = flatengine:FlatEngine\n")
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def avatar(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AVATAR, *args], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300, check=False)


def test_an_installed_engine_renders_through_avatar_gen(media: dict[str, Path], tmp_path: Path,
                                                         plugin: dict[str, str]) -> None:
    preset = tmp_path / "flat.yaml"
    preset.write_text("engine: flat\nsize: 128*128\ninfer_frames: 12\nclips_per_batch: 2\n"
                      "flat:\n  grey: 200\n")
    out = tmp_path / "flat.mp4"
    run = avatar(["gen", str(media["speech6"]), str(media["portrait"]), "-p", str(preset),
                  "-o", str(out), "--json"], plugin)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["engine"] == "flat" and summary["batches"] > 1  # several batch processes
    assert m.video_frames(out) == summary["frames"]
    planes = next(m.read_frames(out, width=128, height=128))
    luma = planes[:128].astype(np.float64)
    # grey 200 in RGB is luma 16 + 200 * 219 / 255 = 187.8 in limited-range YUV
    assert abs(luma.mean() - 187.8) < 2.0


def test_the_engine_section_is_validated_like_a_built_in_one(media: dict[str, Path],
                                                             tmp_path: Path,
                                                             plugin: dict[str, str]) -> None:
    preset = tmp_path / "flat.yaml"
    preset.write_text("engine: flat\nsize: 128*128\nflat:\n  grey: 300\n")
    run = avatar(["gen", str(media["speech6"]), str(media["portrait"]), "-p", str(preset),
                  "-o", str(tmp_path / "x.mp4")], plugin)
    assert run.returncode == 2
    assert "flat.grey must be within [0, 255], got 300" in run.stderr
    preset.write_text("engine: flat\nsize: 256*256\n")  # the engine's own rule
    run = avatar(["gen", str(media["speech6"]), str(media["portrait"]), "-p", str(preset),
                  "-o", str(tmp_path / "x.mp4")], plugin)
    assert run.returncode == 2 and "size must be 128*128 for the flat engine" in run.stderr
    preset.write_text("engine: flat\nsize: 128*128\nflat:\n  grey: 7\n")
    shown = avatar(["presets", "show", str(preset)], plugin)
    assert shown.returncode == 0, shown.stderr
    assert "engine: flat" in shown.stdout and "grey: 7" in shown.stdout
    assert "liveavatar:" not in shown.stdout  # only the section of the engine in use


def test_without_the_package_the_engine_is_unknown(media: dict[str, Path],
                                                   tmp_path: Path) -> None:
    preset = tmp_path / "flat.yaml"
    preset.write_text("engine: flat\nsize: 128*128\n")
    run = avatar(["gen", str(media["speech6"]), str(media["portrait"]), "-p", str(preset),
                  "-o", str(tmp_path / "x.mp4")], dict(os.environ))
    assert run.returncode == 2
    assert "engine must be one of builtin, liveavatar, command, got 'flat'" in run.stderr
