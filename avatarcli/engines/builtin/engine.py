"""The default engine: animates the portrait on the CPU, no weights needed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from avatarcli.engines.base import Engine, JobInputs, PartTask, Progress
from avatarcli.errors import EngineError
from avatarcli.options import knob
from avatarcli.slot import THREADS_VAR

CHUNK_FRAMES = 8  # frames per call: small chunks keep the encoder fed and memory flat (measured)
# Chunk buffers reused in turn: the writer's queue, the one in the pipe, the one being drawn.
RING_CHUNKS = 6


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

        from avatarcli.engines.builtin.animate import (
            Animator,
            AnimatorOptions,
            mouth_openness,
            mouth_spread,
        )
        from avatarcli.engines.builtin.face import FaceLayout
        from avatarcli.media import streams

        threads = int(os.environ.get(THREADS_VAR, "0"))
        if threads > 0:  # concurrent batches share the cores (OpenCV has its own pool)
            cv2.setNumThreads(threads)
        opts = self.preset.section(BuiltinOptions)
        inp, batch = task.inputs, task.batch
        # OpenCV reads the job's 8-bit RGB PNG to the same pixels as PIL, and is loaded here
        # anyway (PIL would be one more import on every batch process's start).
        bgr = cv2.imread(str(inp.portrait), cv2.IMREAD_COLOR)
        if bgr is None:
            raise EngineError(f"{inp.portrait}: cannot read the job's portrait")
        portrait = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
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
        # Frames go to x264 as YUV 4:2:0 (half the bytes of RGB, no conversion in ffmpeg).
        # Outside the animator's changed box every frame is the portrait, so chunk buffers
        # are filled with the portrait's YUV once and reused; per frame only the box is
        # drawn, converted and pasted (the box's corners are even: the same bytes as
        # converting the whole frame).
        static = cv2.cvtColor(portrait, cv2.COLOR_RGB2YUV_I420)
        box = animator.changed_box
        ring = np.empty((RING_CHUNKS, CHUNK_FRAMES, *static.shape), np.uint8)
        ring[...] = static
        with streams.VideoWriter(task.out, width=inp.width, height=inp.height, fps=inp.fps,
                               preset=opts.x264_preset, crf=opts.crf, threads=threads,
                               pix_fmt="yuv420p") as writer:
            for n, start in enumerate(range(batch.frame_start, batch.frame_end, CHUNK_FRAMES)):
                end = min(start + CHUNK_FRAMES, batch.frame_end)
                if n >= RING_CHUNKS:  # the writer owns a buffer until ffmpeg has it
                    writer.wait_written(n - RING_CHUNKS + 1)
                chunk = ring[n % RING_CHUNKS, : end - start]
                if box is not None:
                    for k, i in enumerate(range(start, end)):
                        local = i - batch.frame_start
                        paste_i420(chunk[k], animator.render_box(i, float(openness[local]),
                                                                 float(spread[local])), box)
                writer.write(chunk)
                progress(end - batch.frame_start)


def paste_i420(frame: np.ndarray, rgb: np.ndarray, box: tuple[int, int, int, int]) -> None:
    """Convert `rgb` (the pixels of `box`, even corners) to I420 into that box of `frame`,
    one (H*3/2, W) I420 frame as cv2.COLOR_RGB2YUV_I420 lays it out."""
    import cv2

    x0, y0, x1, y1 = box
    h, w = y1 - y0, x1 - x0
    height, width = frame.shape[0] * 2 // 3, frame.shape[1]
    sub = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420).reshape(-1)
    frame[y0:y1, x0:x1] = sub[: h * w].reshape(h, w)
    planes = frame.reshape(-1)[height * width:].reshape(2, height // 2, width // 2)
    sub_planes = sub[h * w:].reshape(2, h // 2, w // 2)
    planes[:, y0 // 2 : y1 // 2, x0 // 2 : x1 // 2] = sub_planes
