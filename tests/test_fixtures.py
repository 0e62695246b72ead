"""The test/demo input generators in scripts/fixtures.py make what they claim."""

from __future__ import annotations

import subprocess
import sys
import wave
from pathlib import Path

import fixtures
import numpy as np
import pytest

from avatarcli import demo
from avatarcli.media import ffmpeg_bin

REPO = Path(__file__).resolve().parent.parent

pytest.importorskip("espeakng_loader")
pytest.importorskip("skimage")

RATE = fixtures.SAMPLE_RATE


def wav_params(path: Path) -> tuple[int, int, int, int]:
    """(rate, channels, sample width in bytes, frames)"""
    with wave.open(str(path), "rb") as w:
        return w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()


def frame_db(samples: np.ndarray, rate: int, frame_s: float = 0.02) -> np.ndarray:
    """RMS level of consecutive frames in dBFS (digital silence: -120)."""
    n = int(rate * frame_s)
    x = samples[: len(samples) // n * n].astype(np.float64).reshape(-1, n) / 32768.0
    rms = np.sqrt((x**2).mean(axis=1))
    return np.asarray(20 * np.log10(np.maximum(rms, 1e-6)))


def silent_runs(db: np.ndarray, frame_s: float = 0.02, floor: float = -60.0) -> list[float]:
    """Lengths in seconds of the runs of frames quieter than `floor`."""
    runs: list[float] = []
    count = 0
    for quiet in [*(db < floor).tolist(), False]:
        if quiet:
            count += 1
        elif count:
            runs.append(count * frame_s)
            count = 0
    return runs


def assert_speech_like(path: Path, seconds: float, *, long_pause: bool) -> None:
    samples, rate = fixtures.read_wav(path)
    db = frame_db(samples, rate)
    loud = (db > -35).mean()
    assert 0.35 < loud < 0.9, f"loud fraction {loud:.2f}"
    runs = silent_runs(db)
    inner = runs[1:-1]  # between the leading and trailing silence
    assert len(inner) >= 2, runs
    assert any(0.28 <= r <= 1.3 for r in inner), runs
    if long_pause:
        assert any(1.7 <= r <= 2.4 for r in runs), runs


# --- speech ---------------------------------------------------------------------------------


def test_synth_speech_writes_mono_16bit_22050(tmp_path: Path) -> None:
    out = fixtures.synth_speech("Hello there, this is a short test.", tmp_path / "a.wav")
    rate, channels, width, frames = wav_params(out)
    assert (rate, channels, width) == (22050, 1, 2)
    assert 1.0 < frames / rate < 4.0
    samples, _ = fixtures.read_wav(out)
    assert np.abs(samples).max() > 8000  # real sound, not silence
    assert np.abs(samples).max() < 32767  # and not clipped


def test_synth_speech_is_deterministic_across_calls(tmp_path: Path) -> None:
    text = "Repeat after me: the same words, the same samples."
    a = fixtures.synth_speech(text, tmp_path / "a.wav")
    fixtures.synth_speech("Something else in between, to move it on.", tmp_path / "x.wav")
    demo._synth_cached.cache_clear()  # really synthesise again
    b = fixtures.synth_speech(text, tmp_path / "b.wav")
    assert a.read_bytes() == b.read_bytes()


def test_synth_speech_deterministic_in_a_fresh_process(tmp_path: Path) -> None:
    text = fixtures.SENTENCES[0]
    here = fixtures.synth_speech(text, tmp_path / "here.wav")
    code = (
        f"import sys; from avatarcli import demo; "
        f"from pathlib import Path; demo.synth_speech({text!r}, Path(sys.argv[1]))"
    )
    there = tmp_path / "there.wav"
    subprocess.run([sys.executable, "-c", code, str(there)], check=True, cwd=REPO)
    assert here.read_bytes() == there.read_bytes()


def test_synth_speech_rate_pitch_and_voice(tmp_path: Path) -> None:
    text = "Counting slowly from one to ten."
    slow = fixtures.synth_samples(text, rate_wpm=120)
    fast = fixtures.synth_samples(text, rate_wpm=260)
    assert len(fast) < 0.7 * len(slow)
    low = fixtures.synth_samples(text, pitch=20)
    high = fixtures.synth_samples(text, pitch=80)
    assert not np.array_equal(low, high)
    assert len(fixtures.synth_samples(text, voice="en")) > 0
    with pytest.raises(ValueError):
        fixtures.synth_samples(text, voice="no-such-voice-xx")
    with pytest.raises(ValueError):
        fixtures.synth_samples("   ")


@pytest.mark.parametrize("index", range(len(fixtures.SENTENCES)))
def test_each_sentence_has_a_plausible_duration(index: int) -> None:
    samples = fixtures.synth_samples(fixtures.SENTENCES[index])
    assert 2.0 <= len(samples) / RATE <= 4.2


@pytest.mark.parametrize("seconds", [10.0, 7.3, 30.0])
def test_speech_track_length_and_format(tmp_path: Path, seconds: float) -> None:
    out = fixtures.speech_track(tmp_path / "t.wav", seconds=seconds)
    assert wav_params(out) == (22050, 1, 2, round(seconds * 22050))


def test_speech_track_has_speech_and_pauses(tmp_path: Path) -> None:
    out = fixtures.speech_track(tmp_path / "t.wav", seconds=20.0, seed=1)
    assert_speech_like(out, 20.0, long_pause=True)


def test_speech_track_is_deterministic_and_seeded(tmp_path: Path) -> None:
    a = fixtures.speech_track(tmp_path / "a.wav", seconds=12.0, seed=5)
    b = fixtures.speech_track(tmp_path / "b.wav", seconds=12.0, seed=5)
    c = fixtures.speech_track(tmp_path / "c.wav", seconds=12.0, seed=6)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_speech_track_shorter_than_a_sentence(tmp_path: Path) -> None:
    out = fixtures.speech_track(tmp_path / "t.wav", seconds=1.0)
    samples, _ = fixtures.read_wav(out)
    assert len(samples) == 22050
    assert np.abs(samples).max() > 4000
    assert abs(int(samples[-1])) < 200  # faded out, no click


def test_tone_speech(tmp_path: Path) -> None:
    out = fixtures.tone_speech(tmp_path / "t.wav", 15.0, seed=2)
    assert wav_params(out) == (22050, 1, 2, round(15.0 * 22050))
    assert_speech_like(out, 15.0, long_pause=True)
    again = fixtures.tone_speech(tmp_path / "u.wav", seconds=15.0, seed=2)
    assert out.read_bytes() == again.read_bytes()


# --- audio containers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("variants")
    src = fixtures.speech_track(d / "src.wav", seconds=4.0, seed=3)
    return fixtures.audio_variants(src, d)


EXPECTED = {
    "wav_f32_24k": ("pcm_f32le", 24000, 1, ".wav"),
    "mp3_stereo_44k": ("mp3", 44100, 2, ".mp3"),
    "m4a_aac": ("aac", 22050, 1, ".m4a"),
    "flac": ("flac", 22050, 1, ".flac"),
    "wav_8k_phone": ("pcm_s16le", 8000, 1, ".wav"),
    "ogg_opus": ("opus", 48000, 1, ".ogg"),
}


def test_audio_variants_cover_the_list(variants: dict[str, Path]) -> None:
    assert set(variants) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_audio_variant_decodes_with_expected_stream(variants: dict[str, Path], name: str) -> None:
    codec, rate, channels, suffix = EXPECTED[name]
    path = variants[name]
    assert path.suffix == suffix
    info = fixtures.audio_info(path)  # decodes the whole file; raises if ffmpeg fails
    assert info is not None
    assert (info.codec, info.rate, info.channels) == (codec, rate, channels)
    assert info.duration is not None and abs(info.duration - 4.0) < 0.1
    assert info.decoded is not None and abs(info.decoded - 4.0) < 0.1


def test_transcode_rate_and_channels(tmp_path: Path) -> None:
    src = fixtures.tone_speech(tmp_path / "t.wav", 2.0)
    out = fixtures.transcode(src, tmp_path / "o.wav", rate=16000, channels=2)
    assert wav_params(out)[:3] == (16000, 2, 2)


# --- images ---------------------------------------------------------------------------------


def test_portrait_png_and_jpeg(tmp_path: Path) -> None:
    from PIL import Image

    png = fixtures.portrait(tmp_path / "p.png")
    jpg = fixtures.portrait(tmp_path / "p.jpg", size=256)
    with Image.open(png) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGB", (512, 512))
    with Image.open(jpg) as im:
        assert (im.format, im.size) == ("JPEG", (256, 256))
    assert fixtures.portrait(tmp_path / "q.png").read_bytes() == png.read_bytes()


def test_portrait_face_is_centred_in_the_upper_part(tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    img = np.asarray(fixtures.portrait_image(512))
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    faces = cascade.detectMultiScale(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), 1.1, 5)
    assert len(faces) == 1
    x, y, w, h = faces[0]
    assert abs((x + w / 2) - 256) < 40
    assert 0.2 * 512 < y + h / 2 < 0.45 * 512
    assert 0.2 * 512 < w < 0.45 * 512


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return fixtures.portrait_variants(tmp_path_factory.mktemp("images"))


def test_portrait_variants(images: dict[str, Path]) -> None:
    from PIL import Image

    assert set(images) == {"jpeg", "png_alpha", "jpeg_exif_rotated", "tiny", "not_face", "cyclops"}
    with Image.open(images["jpeg"]) as im:
        assert (im.format, im.size) == ("JPEG", (512, 512))
    with Image.open(images["tiny"]) as im:
        assert (im.format, im.size) == ("PNG", (48, 48))
    for name in ("not_face", "cyclops"):
        with Image.open(images[name]) as im:
            assert (im.format, im.size) == ("PNG", (256, 256))
            assert len(im.getcolors(maxcolors=4096) or []) < 400  # flat colours, a drawing


def test_png_alpha_is_transparent_outside_the_ellipse(images: dict[str, Path]) -> None:
    from PIL import Image

    with Image.open(images["png_alpha"]) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGBA", (512, 512))
        alpha = np.asarray(im)[:, :, 3]
    assert alpha[0, 0] == 0 and alpha[0, 511] == 0 and alpha[511, 0] == 0
    assert alpha[256, 256] == 255 and alpha[150, 256] == 255
    assert 0.1 < (alpha == 0).mean() < 0.4


def test_exif_rotated_jpeg_comes_back_upright(images: dict[str, Path]) -> None:
    from PIL import Image, ImageOps

    with Image.open(images["jpeg_exif_rotated"]) as im:
        assert im.format == "JPEG"
        assert im.getexif().get(0x0112) in (6, 8)
        assert im.size == (512, 384)  # stored sideways
        upright = ImageOps.exif_transpose(im)
    assert upright is not None
    assert upright.size == (384, 512)
    reference = np.asarray(fixtures.portrait_image(512).crop((64, 0, 448, 512)), dtype=np.float64)
    got = np.asarray(upright.convert("RGB"), dtype=np.float64)
    assert np.abs(got - reference).mean() < 6.0  # same picture, JPEG noise only
    flipped = np.asarray(upright.convert("RGB").rotate(180), dtype=np.float64)
    assert np.abs(flipped - reference).mean() > 30.0  # and the check above can tell


# --- bad files ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return fixtures.bad_files(tmp_path_factory.mktemp("bad"))


def test_bad_files_are_what_they_say(bad: dict[str, Path]) -> None:
    from PIL import Image, UnidentifiedImageError

    assert set(bad) == {
        "jpeg_named_wav", "empty_wav", "silence_wav", "video_no_audio", "text_named_png",
        "truncated_mp3",
    }

    p = bad["jpeg_named_wav"]
    assert p.suffix == ".wav" and p.read_bytes()[:3] == b"\xff\xd8\xff"
    with pytest.raises((wave.Error, EOFError)), wave.open(str(p), "rb"):
        pass

    p = bad["empty_wav"]
    assert p.suffix == ".wav" and wav_params(p) == (22050, 1, 2, 0)

    p = bad["silence_wav"]
    assert wav_params(p) == (22050, 1, 2, 3 * 22050)
    assert not fixtures.read_wav(p)[0].any()

    p = bad["video_no_audio"]
    assert p.suffix == ".mp4"
    assert fixtures.audio_info(p) is None  # decodes, but has no audio stream
    text = ffmpeg_bin.run(["-i", str(p), "-f", "null", "-"])
    assert "Video:" in text and "Audio:" not in text
    assert "Duration: 00:00:02.00" in text

    p = bad["text_named_png"]
    assert p.suffix == ".png"
    with pytest.raises(UnidentifiedImageError):
        Image.open(p)


def test_truncated_mp3_claims_more_than_it_holds(bad: dict[str, Path]) -> None:
    info = fixtures.audio_info(bad["truncated_mp3"])
    assert info is not None and info.codec == "mp3"
    assert info.duration is not None and abs(info.duration - 6.0) < 0.1  # what the header says
    assert info.decoded is not None and 1.0 < info.decoded < 4.0  # what is really there


# --- demo script ----------------------------------------------------------------------------


def test_make_demo(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_demo.py"), str(out)],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    )
    speech, image = out / "speech.wav", out / "portrait.png"
    assert proc.stdout.split() == [str(speech), str(image)]
    rate, channels, width, frames = wav_params(speech)
    assert (rate, channels, width) == (22050, 1, 2)
    assert 10.0 <= frames / rate <= 14.0
    first = speech.read_bytes()
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_demo.py"), str(out)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    assert speech.read_bytes() == first
