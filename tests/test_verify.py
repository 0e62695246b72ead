"""The cheap checks of our own files: packets counted instead of frames decoded, the probe
read from the same ffmpeg run, the audio's length from its packet timestamps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from avatarcli.errors import InputError
from avatarcli.media import assemble, ffmpeg_bin, streams
from avatarcli.media.verify import VerifyError, check_video, is_whole

W, H, FPS, FRAMES = 64, 48, 25, 50


@pytest.fixture(scope="module")
def part(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A part as the engine writes one: VideoWriter, x264, faststart."""
    path = tmp_path_factory.mktemp("verify") / "part.mp4"
    rng = np.random.default_rng(3)  # noise: every frame a sizeable packet
    with streams.VideoWriter(path, width=W, height=H, fps=FPS, preset="ultrafast", crf=20) as w:
        w.write(rng.integers(0, 256, (FRAMES, H, W, 3), dtype=np.uint8))
    return path


def test_one_run_gives_the_probe_and_the_packet_count(part: Path) -> None:
    info, frames, error = streams.probe_frames(part, decode=False)
    assert (frames, error) == (FRAMES, "")
    # The same description as `ffmpeg -i` alone: the output's streams are not the input's.
    assert info.streams == streams.probe(part).streams and len(info.streams) == 1
    assert streams.probe_frames(part, decode=True)[1] == FRAMES
    info = check_video(part, frames=FRAMES, width=W, height=H, fps=FPS, decode=False)
    assert info.first("video") is not None


@pytest.mark.parametrize(("kwargs", "said"), [
    ({"frames": FRAMES + 1}, f"{FRAMES} frames, expected {FRAMES + 1}"),
    ({"width": W + 2}, "size 64x48, expected 66x48"),
    ({"fps": 30}, "25 fps, expected 30"),
])
def test_a_part_unlike_the_plan_is_refused(part: Path, kwargs: dict[str, int],
                                           said: str) -> None:
    want = {"frames": FRAMES, "width": W, "height": H, "fps": FPS, **kwargs}
    with pytest.raises(VerifyError, match=said):
        check_video(part, decode=False, **want)
    assert not is_whole(part, **want)


def test_a_cut_part_is_refused_by_the_packet_count(part: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.mp4"
    data = part.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])  # the index (faststart) stays, samples go
    with pytest.raises(VerifyError, match=r"frames, expected|cannot be decoded"):
        check_video(cut, frames=FRAMES, width=W, height=H, fps=FPS, decode=False)


def test_no_video_and_no_media(tmp_path: Path) -> None:
    wav = tmp_path / "tone.wav"
    ffmpeg_bin.run(["-v", "error", "-f", "lavfi", "-i", "sine=d=0.5", str(wav)])
    with pytest.raises(VerifyError, match="no video stream"):
        check_video(wav, frames=1, width=W, height=H, fps=FPS, decode=False)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video" * 100)
    with pytest.raises(InputError, match="not a media file"):
        check_video(junk, frames=1, width=W, height=H, fps=FPS, decode=False)


@pytest.mark.parametrize("rate", [16000, 22050, 48000])
def test_the_audio_length_from_packets_is_the_decoded_length(part: Path, tmp_path: Path,
                                                             rate: int) -> None:
    # An odd length: not a whole number of AAC frames, so the edit list must be honoured.
    seconds = FRAMES / FPS - 0.013
    wav = tmp_path / "speech.wav"
    ffmpeg_bin.run(["-v", "error", "-f", "lavfi", "-i", f"sine=f=220:r={rate}:d={seconds}",
                "-ac", "1", str(wav)])
    out = tmp_path / "out.mp4"
    assemble.assemble([part], wav, out, audio_s=seconds, frames=FRAMES, width=W, height=H,
                      fps=FPS, work_dir=tmp_path)
    by_packets = streams.audio_seconds(out, decode=False)
    assert by_packets == streams.audio_seconds(out, decode=True)
    assert abs(by_packets - seconds) < 1e-4
