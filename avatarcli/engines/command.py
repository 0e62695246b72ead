"""Any talking-head model through a command template: an argument list with placeholders.

No shell is involved, so spaces and quotes in paths are safe. The model renders one batch's
audio slice; its video is verified and normalised to the plan like any engine's part.
"""

from __future__ import annotations

import logging
import shlex
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avatarcli import procs
from avatarcli.engines.base import (
    Engine,
    JobInputs,
    PartTask,
    Progress,
    Resources,
    run_model,
)
from avatarcli.errors import EngineError
from avatarcli.media import streams
from avatarcli.options import Preset, knob

log = logging.getLogger(__name__)

PLACEHOLDERS = ("audio", "image", "out", "outdir", "fps", "size", "width", "height", "seed",
                "prompt", "batch", "frames", "start_s", "duration_s")
# A model may end a little short of its audio (rounding of its own frame count); more than
# this is a broken part, not rounding.
MAX_MISSING_FRACTION = 0.02
MIN_MISSING_FRAMES = 2


def template_fields(template: list[str]) -> set[str]:
    """Placeholder names used in the template (format syntax; `{{` is a literal brace)."""
    names = set()
    for arg in template:
        for _, name, _, _ in string.Formatter().parse(arg):
            if name is not None:
                names.add(name)
    return names


@dataclass(frozen=True)
class CommandOptions:
    """Any other model through a command template (used by the command engine)."""

    # Argument list with placeholders such as {audio}, {image}, {out}.
    template: list[str] = knob([], help="command template")
    # Working directory of the command.
    cwd: str = knob("", help="working directory")
    # Extra environment for the command.
    env: dict[str, str] = knob({}, help="extra environment")
    # Glob inside {outdir} that finds the produced video when the model picks its own name.
    output: str = knob("", help="output glob inside {outdir}")
    # Text for the {prompt} placeholder.
    prompt: str = knob("", help="text prompt")


class CommandEngine(Engine):
    name = "command"
    options = CommandOptions
    takes_prompt = True
    restarts = True  # each launch starts from the portrait again

    def __init__(self, preset: Preset) -> None:
        super().__init__(preset)
        self.opts = preset.section(CommandOptions)

    @classmethod
    def resources(cls, preset: Preset) -> Resources:
        return Resources(cpus=1, gpus=1)  # external models (SadTalker, Wav2Lip...) want a GPU

    def check(self, inputs: JobInputs) -> tuple[list[str], list[str]]:
        opts = self.opts
        problems = []
        if not opts.template:
            return ["command.template is empty: give the model's command line as a list"], []
        try:
            used = template_fields(opts.template)
        except ValueError as exc:
            return [f"command.template: {exc} (write a literal brace as {{{{ or }}}})"], []
        unknown = sorted(used - set(PLACEHOLDERS))
        if unknown:
            problems.append(f"command.template: unknown placeholder {{{unknown[0]}}}; "
                            f"available: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
        if "audio" not in used:
            problems.append("command.template must pass the batch's audio: {audio}")
        if "out" not in used and "outdir" not in used:
            problems.append("command.template must say where the video goes: {out}, or "
                            "{outdir} with command.output (a glob)")
        if "outdir" in used and "out" not in used and not opts.output:
            problems.append("command.output must be a glob (e.g. '*.mp4') when the template "
                            "uses {outdir}")
        if opts.cwd and not Path(opts.cwd).expanduser().is_dir():
            problems.append(f"{opts.cwd}: command.cwd is not a folder")
        exe = opts.template[0]
        if "{" not in exe and not procs.executable(exe, cwd=opts.cwd or None):
            problems.append(f"{exe}: command not found (command.template[0])")
        return problems, []

    def prepare(self, inputs: JobInputs) -> tuple[dict[str, Any], list[str]]:
        return {}, []

    def _paths(self, task: PartTask) -> tuple[Path, Path, Path]:
        i = task.batch.index
        work = task.inputs.job_dir / "raw"
        return (task.inputs.job_dir / "audio" / f"batch-{i:04d}.wav",
                work / f"batch-{i:04d}.mp4", work / f"batch-{i:04d}")

    def command(self, task: PartTask) -> tuple[list[str], dict[str, str]]:
        p, inp, b = self.preset, task.inputs, task.batch
        wav, out, outdir = self._paths(task)
        values = {
            "audio": str(wav), "image": str(inp.image), "out": str(out), "outdir": str(outdir),
            "fps": str(inp.fps), "size": p.size, "width": str(inp.width),
            "height": str(inp.height), "seed": str(p.seed), "prompt": p.command.prompt,
            "batch": str(b.index), "frames": str(b.frames),
            "start_s": f"{b.start_s(inp.fps):.3f}", "duration_s": f"{b.frames / inp.fps:.3f}",
        }
        return [arg.format_map(values) for arg in p.command.template], dict(p.command.env)

    def describe(self, task: PartTask) -> str:
        cmd, env = self.command(task)
        cwd = self.opts.cwd
        prefix = f"cd {shlex.quote(cwd)} && " if cwd else ""
        assigns = "".join(f"{k}={shlex.quote(v)} " for k, v in env.items())
        return f"{prefix}{assigns}{shlex.join(cmd)}"

    def render(self, task: PartTask, progress: Progress) -> None:
        b, inp = task.batch, task.inputs
        wav, out, outdir = self._paths(task)
        for folder in (wav.parent, outdir):
            folder.mkdir(parents=True, exist_ok=True)
        out.unlink(missing_ok=True)
        for old in outdir.iterdir():
            if old.is_file():
                old.unlink()
        streams.slice_audio(inp.audio, wav, start_s=b.start_s(inp.fps),
                          duration_s=b.frames / inp.fps)
        cmd, env = self.command(task)
        cwd = Path(self.opts.cwd).expanduser() if self.opts.cwd else None
        log.info("launch: %s", self.describe(task))
        run_model(cmd, cwd=cwd, env=env, label=f"batch {b.index}: {cmd[0]}")
        produced = self._find_output(out, outdir)
        self._check_length(produced, b.frames, inp.fps, b.index)
        progress(b.frames - 1)
        streams.normalise(produced, task.out, frames=b.frames, width=inp.width,
                        height=inp.height, fps=inp.fps)
        progress(b.frames)

    def _find_output(self, out: Path, outdir: Path) -> Path:
        if "out" in template_fields(self.opts.template):
            found = out if out.is_file() and out.stat().st_size else None
        else:
            matches = sorted((p for p in outdir.glob(self.opts.output) if p.is_file()),
                             key=lambda p: p.stat().st_mtime)
            found = matches[-1] if matches else None
        if found is None:
            where = out if "out" in template_fields(self.opts.template) \
                else f"{outdir}/{self.opts.output}"
            raise EngineError(f"the command exited 0 but wrote no video ({where})")
        return found

    def _check_length(self, path: Path, frames: int, fps: int, index: int) -> None:
        """The model's video must cover the batch (re-timed to our fps) within rounding."""
        info = streams.probe(path)
        video = info.first("video")
        if video is None:
            raise EngineError(f"batch {index}: {path} has no video stream")
        try:
            got = streams.video_frames(path)
        except Exception as exc:
            raise EngineError(f"batch {index}: {path} does not decode ({exc})") from exc
        src_fps = video.fps or fps
        covered = got * fps / src_fps
        allowed = max(MIN_MISSING_FRAMES, MAX_MISSING_FRACTION * frames)
        if covered < frames - allowed:
            raise EngineError(f"batch {index}: {path} has {got} frames at {src_fps:g} fps "
                              f"({got / src_fps:.2f} s); the batch needs {frames / fps:.2f} s")
