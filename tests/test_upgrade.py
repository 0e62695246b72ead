"""Jobs and outputs made before engines declared their own preset sections (0.1.0 identified a
job with every built-in engine's section) are the same jobs now: resumed, and current."""

from __future__ import annotations

import json
from pathlib import Path

from avatarcli import presets
from avatarcli.job import file_digest, job_key
from avatarcli.media import ffmpeg_bin
from avatarcli.options import NON_RENDERING_KEYS, Preset
from avatarcli.pipeline import TAG_PREFIX, generate, output_is_current

SETTINGS = presets.parse_set(["size=128*128", "clips_per_batch=2", "infer_frames=24"])


def earlier_key(audio: Path, image: Path, preset: Preset) -> str:
    """The key as the earlier layout computed it: all of Preset.to_dict() but the
    non-rendering keys (so the builtin, liveavatar and command sections alike), and the face."""
    rendering = {k: v for k, v in preset.to_dict().items() if k not in NON_RENDERING_KEYS}
    rendering["face"] = None
    return job_key({"audio": file_digest(audio), "image": file_digest(image)}, rendering)


def test_a_job_of_the_earlier_layout_resumes(media: dict[str, Path], tmp_path: Path) -> None:
    resolved = presets.resolve(None, SETTINGS)
    out = tmp_path / "talk.mp4"
    first = generate(media["speech6"], media["portrait"], resolved, output=out,
                     keep_parts=True)
    assert len(first.batches) > 1
    manifest = first.job_dir / "manifest.json"
    data = json.loads(manifest.read_text())
    old = earlier_key(media["speech6"], media["portrait"], resolved.preset)
    assert old != data["key"]  # the layouts differ, so the test means something
    manifest.write_text(json.dumps({**data, "key": old}))
    out.unlink()
    again = generate(media["speech6"], media["portrait"], resolved, output=out,
                     keep_parts=True)
    assert again.reused == list(range(len(first.batches))) and again.rendered == []
    assert json.loads(manifest.read_text())["key"] == data["key"]  # carried on under today's


def test_an_output_of_the_earlier_layout_is_current(media: dict[str, Path],
                                                    tmp_path: Path) -> None:
    resolved = presets.resolve(None, SETTINGS)
    out = tmp_path / "talk.mp4"
    generate(media["speech6"], media["portrait"], resolved, output=out)
    assert output_is_current(out, media["speech6"], media["portrait"], resolved.preset)
    old = earlier_key(media["speech6"], media["portrait"], resolved.preset)
    retagged = tmp_path / "retagged.mp4"
    ffmpeg_bin.run(["-v", "error", "-i", str(out), "-map", "0", "-c", "copy",
                    "-metadata", f"comment={TAG_PREFIX}{old}", str(retagged)])
    assert output_is_current(retagged, media["speech6"], media["portrait"], resolved.preset)
    ffmpeg_bin.run(["-v", "error", "-i", str(out), "-map", "0", "-c", "copy",
                    "-metadata", f"comment={TAG_PREFIX}0123456789abcdef", str(retagged), "-y"])
    assert not output_is_current(retagged, media["speech6"], media["portrait"],
                                 resolved.preset)
