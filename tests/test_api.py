"""The Python API (`import avatarcli`): a script renders without the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import avatarcli
from avatarcli.errors import InputError
from avatarcli.media import streams as m


def test_a_script_renders_with_generate(media: dict[str, Path], tmp_path: Path) -> None:
    preset = avatarcli.load_preset("cpu-preview", {"size": "128*128"})
    out = tmp_path / "talk.mp4"
    result = avatarcli.generate(str(media["speech6"]), media["portrait"], preset, output=out,
                                options=avatarcli.GenerateOptions(jobs=2))
    assert isinstance(result, avatarcli.Result)
    assert result.output == out and (result.width, result.height) == (128, 128)
    assert m.video_frames(out) == result.frames == round(result.duration_s * result.fps)
    again = avatarcli.generate(media["speech6"], media["portrait"], "cpu-preview",
                               output=out, dry_run=True)  # a name, and an option as a keyword
    assert again.dry_run and again.width == 512  # the named preset's own size


def test_bad_input_raises_the_cli_s_errors(media: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InputError) as caught:
        avatarcli.generate(tmp_path / "missing.wav", media["portrait"],
                           output=tmp_path / "x.mp4")
    assert "missing.wav: audio file not found" in str(caught.value)
    assert caught.value.exit_code == 2
    with pytest.raises(AttributeError):
        avatarcli.no_such_name  # noqa: B018


def test_importing_avatarcli_loads_no_pipeline() -> None:
    code = ("import sys, avatarcli; "
            "print(any(k.startswith(('avatarcli.pipeline', 'numpy')) for k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
