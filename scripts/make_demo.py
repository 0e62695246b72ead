"""Write the demo inputs: OUTDIR/speech.wav (about 12 s of offline TTS) and OUTDIR/portrait.png.

    python scripts/make_demo.py OUTDIR

Needs the `demo` extra (espeakng-loader, scikit-image). Re-running overwrites the two files with
identical bytes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fixtures

DEMO_SENTENCES = (
    "Hello! This is a short demo of avatar C L I.",
    "It turns a voice recording and one portrait into a talking video.",
    "Everything runs offline, right here on your own computer.",
)
DEMO_SECONDS = 12.0


def demo_speech(path: Path) -> Path:
    """The demo sentences with natural pauses, padded with silence to 12 s (22050 Hz mono)."""
    rate = fixtures.SAMPLE_RATE
    pauses = (0.25, 0.55, 0.45)  # silence before each sentence
    parts: list[np.ndarray] = []
    for pause, text in zip(pauses, DEMO_SENTENCES, strict=True):
        parts.append(np.zeros(round(pause * rate), dtype=np.int16))
        parts.append(fixtures.synth_samples(text, rate_wpm=165))
    audio = np.concatenate(parts)
    target = round(DEMO_SECONDS * rate)
    if audio.size < target:
        audio = np.concatenate([audio, np.zeros(target - audio.size, dtype=np.int16)])
    return fixtures.write_wav(path, audio, rate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("outdir", type=Path, help="folder to write speech.wav and portrait.png")
    args = parser.parse_args(argv)
    outdir: Path = args.outdir
    outdir.mkdir(parents=True, exist_ok=True)
    try:
        speech = demo_speech(outdir / "speech.wav")
        image = fixtures.portrait(outdir / "portrait.png", size=512)
    except RuntimeError as exc:  # a missing optional dependency, with its pip hint
        print(f"make_demo: {exc}", file=sys.stderr)
        return 1
    print(speech)
    print(image)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
