"""Write the demo inputs: OUTDIR/speech.wav (about 12 s of offline TTS) and OUTDIR/portrait.png.

    python scripts/make_demo.py OUTDIR

Needs the `demo` extra (espeakng-loader, scikit-image). Re-running overwrites the two files with
identical bytes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from avatarcli import demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("outdir", type=Path, help="folder to write speech.wav and portrait.png")
    args = parser.parse_args(argv)
    outdir: Path = args.outdir
    outdir.mkdir(parents=True, exist_ok=True)
    try:
        speech = demo.demo_speech(outdir / "speech.wav")
        image = demo.portrait(outdir / "portrait.png", size=512)
    except RuntimeError as exc:  # a missing optional dependency, with its pip hint
        print(f"make_demo: {exc}", file=sys.stderr)
        return 1
    print(speech)
    print(image)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
