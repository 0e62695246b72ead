"""The default engine: animates the portrait on the CPU, no weights needed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from avatarcli.engines.base import Engine, JobInputs, PartTask, Progress
from avatarcli.options import knob

CHUNK_FRAMES = 8  # frames per call: small chunks keep the encoder fed and memory flat (measured)


@dataclass(frozen=True)
class BuiltinOptions:
    """Knobs of the built-in CPU animator."""

    # Scales the mouth opening; 0 keeps the mouth closed.
    mouth_gain: float = knob(1.0, bounds=(0.0, 3.0), help="mouth opening scale")
    # Average blinks per minute; 0 disables blinking.
    blink_rate_per_min: float = knob(15.0, bounds=(0.0, 60.0), help="blinks per minute")
    # Head motion amplitude: 1 is subtle, 0 is still.
    head_motion: float = knob(1.0, bounds=(0.0, 3.0), help="head motion scale")
    # Show a hint of upper teeth when the mouth is wide open.
    teeth: bool = knob(True, help="draw upper teeth when wide open")
    # x264 speed/size trade-off for parts; all parts of a job must share it (they are joined by copy).
    x264_preset: str = knob("veryfast", choices=("ultrafast", "superfast", "veryfast", "faster",
                                                  "fast", "medium", "slow"), help="x264 preset")
    # x264 constant rate factor: lower is better quality and bigger files.
    crf: int = knob(20, bounds=(0, 51), help="x264 CRF")


class BuiltinEngine(Engine):
    name = "builtin"
    options = BuiltinOptions
    # The default batch time limit: about 40x what it needs on 2 CPU cores.
    timeout_start_s = 300.0
    timeout_per_frame_s = 2.0

    def prepare(self, inputs: JobInputs) -> tuple[dict[str, Any], list[str]]:
        from PIL import Image

        from avatarcli.engines.builtin.face import fallback_layout, find_face, layout_from_box

        with Image.open(inputs.portrait) as im:
            rgb = np.asarray(im.convert("RGB"))
        warnings = []
        if inputs.face is not None:
            layout = layout_from_box(*inputs.face)
        else:
            found = find_face(rgb)
            if found is None:
                warnings.append(f"{inputs.image}: no face found; animating a centred face area "
                                f"(place it with --face X,Y,W,H)")
                layout = fallback_layout(inputs.width, inputs.height)
            else:
                layout = found
        return {"layout": layout.to_dict()}, warnings

    def render(self, task: PartTask, progress: Progress) -> None:
        import cv2
        from PIL import Image

        from avatarcli.engines.builtin.animate import (
            Animator,
            AnimatorOptions,
            mouth_openness,
            mouth_spread,
        )
        from avatarcli.engines.builtin.face import FaceLayout
        from avatarcli.media import streams

        threads = int(os.environ.get("AVATARCLI_THREADS", "0"))
        if threads > 0:  # concurrent batches share the cores (OpenCV has its own pool)
            cv2.setNumThreads(threads)
        opts = self.preset.section(BuiltinOptions)
        inp, batch = task.inputs, task.batch
        with Image.open(inp.portrait) as im:
            portrait = np.asarray(im.convert("RGB"))
        layout = FaceLayout.from_dict(task.engine_state["layout"])
        features = np.load(inp.features, mmap_mode="r")[batch.frame_start:batch.frame_end]
        features = np.asarray(features, dtype=np.float32)
        openness = mouth_openness(features, opts.mouth_gain)
        spread = mouth_spread(features)
        animator = Animator(
            portrait, layout, seed=self.preset.seed, fps=inp.fps,
            options=AnimatorOptions(mouth_gain=opts.mouth_gain,
                                    blink_rate_per_min=opts.blink_rate_per_min,
                                    head_motion=opts.head_motion, teeth=opts.teeth),
        )
        with streams.VideoWriter(task.out, width=inp.width, height=inp.height, fps=inp.fps,
                               preset=opts.x264_preset, crf=opts.crf, threads=threads,
                               pix_fmt="yuv420p") as writer:
            for start in range(batch.frame_start, batch.frame_end, CHUNK_FRAMES):
                end = min(start + CHUNK_FRAMES, batch.frame_end)
                indices = np.arange(start, end, dtype=np.int64)
                local = slice(start - batch.frame_start, end - batch.frame_start)
                rgb = animator.render(indices, openness[local], spread[local])
                # A fresh buffer per chunk: the writer owns it until ffmpeg has read it.
                yuv = np.empty((len(rgb), inp.height * 3 // 2, inp.width), np.uint8)
                for i, frame in enumerate(rgb):
                    cv2.cvtColor(frame, cv2.COLOR_RGB2YUV_I420, dst=yuv[i])
                writer.write(yuv)
                progress(end - batch.frame_start)
