"""The job's audio is encoded to AAC while the parts render, and the output copies it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from avatarcli import presets
from avatarcli.media import assemble, ffmpeg_bin
from avatarcli.pipeline import generate


def audio_md5(path: Path) -> str:
    """MD5 of the first audio stream's packets (copied, not decoded)."""
    out = ffmpeg_bin.popen(["-v", "error", "-i", str(path), "-map", "0:a:0", "-c", "copy",
                            "-f", "md5", "-"], stdout=subprocess.PIPE)
    assert out.stdout is not None
    text = out.stdout.read().decode()
    assert out.wait() == 0
    return text.strip()


SMALL = presets.parse_set(["size=128*128"])


@pytest.fixture
def mux_args(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The arguments of assembly's ffmpeg runs (the last one muxes the audio)."""
    calls: list[list[str]] = []
    real = ffmpeg_bin.run

    def spy(args: list[str], **kwargs: object) -> str:
        calls.append(list(args))
        return real(args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(assemble.ffmpeg_bin, "run", spy)
    return calls


def audio_codec_args(calls: list[list[str]]) -> list[str]:
    mux = [c for c in calls if "concat" in c][-1]
    i = mux.index("-c:a")
    return mux[i:i + 2]


def test_the_output_carries_the_audio_encoded_in_the_background(
        media: dict[str, Path], tmp_path: Path, mux_args: list[list[str]]) -> None:
    out = tmp_path / "talk.mp4"
    result = generate(media["speech6"], media["portrait"], presets.resolve(None, SMALL),
                      output=out, keep_parts=True)
    encoded = result.job_dir / "audio.m4a"
    assert encoded.is_file() and not (result.job_dir / ".audio-encode.m4a").exists()
    assert audio_codec_args(mux_args) == ["-c:a", "copy"]  # copied, not encoded again
    assert audio_md5(out) == audio_md5(encoded)


def test_a_failed_background_encode_falls_back_to_encoding_inline(
        media: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        mux_args: list[list[str]]) -> None:
    def failed(self: assemble.AudioEncode) -> None:
        self.cancel()

    monkeypatch.setattr(assemble.AudioEncode, "result", failed)
    out = tmp_path / "talk.mp4"
    result = generate(media["speech6"], media["portrait"], presets.resolve(None, SMALL),
                      output=out, keep_parts=True)
    assert not (result.job_dir / "audio.m4a").exists()
    assert audio_codec_args(mux_args) == ["-c:a", "aac"]
    inline = tmp_path / "inline.m4a"  # what assembly's own encode of the timeline gives
    ffmpeg_bin.run(["-v", "error", "-i", str(result.job_dir / "audio.wav"),
                    *assemble.AAC_ARGS, str(inline)])
    assert audio_md5(out) == audio_md5(inline)


def test_a_failed_job_leaves_no_half_encoded_audio(media: dict[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from avatarcli import pipeline
    from avatarcli.errors import EngineError

    job = tmp_path / "talk.mp4.parts"

    def broken(*args: object, **kwargs: object) -> None:
        deadline = time.monotonic() + 30  # the background encode has begun writing
        while not (job / ".audio-encode.m4a").exists() and not (job / "audio.m4a").exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        raise EngineError("simulated batch failure")

    monkeypatch.setattr(pipeline.Runner, "run", broken)
    out = tmp_path / "talk.mp4"
    with pytest.raises(EngineError):
        generate(media["speech6"], media["portrait"], presets.resolve(None, SMALL), output=out)
    assert job.is_dir() and not out.exists()
    assert not (job / ".audio-encode.m4a").exists() and not (job / "audio.m4a").exists()
