"""A job's inputs, checked in one place for every command (`gen`, `batch`, `plan` and the
Python API): the paths, the audio stream, the frame size the engine renders the portrait at,
and the analysis and plan of the audio."""

from __future__ import annotations

import os
from pathlib import Path

from avatarcli import analysis
from avatarcli.engines.base import Engine
from avatarcli.errors import InputError
from avatarcli.job import JobDir
from avatarcli.media import streams
from avatarcli.options import Preset
from avatarcli.plan import Plan, make_plan
from avatarcli.presets import parse_size


def default_output(audio: Path) -> Path:
    out = audio.with_suffix(".mp4")
    return out.with_name(audio.stem + ".avatar.mp4") if out == audio else out


def path_problem(path: Path, what: str) -> str | None:
    """Why `path` cannot be used as given (a symlink loop, a name that is not UTF-8 or too
    long, a path through a file), or None. Nothing is created."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return f"{path}: {what} path is not valid UTF-8; rename the file"
    try:
        os.stat(path)
    except FileNotFoundError:
        return None  # said by the caller, which knows whether it must exist
    except OSError as exc:
        return f"{path}: {what} path cannot be used ({exc.strerror})"
    except ValueError:  # a NUL byte
        return f"{str(path)!r}: {what} path contains a NUL byte"
    return None


def job_folder_of(path: Path) -> Path | None:
    """The job folder (`OUT.parts/` with a manifest or lock) that `path` lies inside, if any.

    Such a folder is removed when its job finishes, taking anything put there with it."""
    try:
        real = path.resolve()
    except (OSError, RuntimeError):  # a symlink loop: reported by path_problem
        return None
    for folder in real.parents:
        if folder.name.endswith(".parts") and ((folder / "manifest.json").is_file()
                                               or (folder / "lock").is_file()):
            return folder
    return None


def name_problem(output: Path) -> str | None:
    """The output's name must leave room for its job folder (`NAME.parts`) and temporaries."""
    try:
        limit = os.pathconf(output.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if len(os.fsencode(output.name)) + len(".parts") > limit:
        return (f"{output}: output file name is too long for this filesystem "
                f"(at most {limit - len('.parts')} bytes, to leave room for its job folder)")
    return None


def path_problems(audio: Path, image: Path, output: Path, *,
                  output_may_exist: bool) -> list[str]:
    """Every problem of the three paths, each naming the file (nothing is created).
    `output_may_exist`: an existing output is fine (--force, a dry run, `avatar batch`)."""
    problems = []
    for what, path in (("audio", audio), ("image", image)):
        bad = path_problem(path, what)
        if bad:
            problems.append(bad)
        elif not path.exists():
            problems.append(f"{path}: {what} file not found")
        elif not path.is_file():
            problems.append(f"{path}: {what} is not a file")
        elif not os.access(path, os.R_OK):
            problems.append(f"{path}: {what} file is not readable")
        elif (inside := job_folder_of(path)) is not None:
            problems.append(f"{path}: {what} file lies inside the job folder {inside}, which "
                            f"is removed when that job finishes; move it elsewhere")
    bad = path_problem(output, "output") or path_problem(output.parent, "output folder")
    if bad:
        problems.append(bad)
        return problems
    folder = output.parent
    job = JobDir.for_output(output).path
    if not folder.is_dir():
        problems.append(f"{output}: output folder {folder} does not exist")
    elif not os.access(folder, os.W_OK | os.X_OK):
        problems.append(f"{output}: output folder {folder} is not writable")
    elif output.is_dir():
        problems.append(f"{output}: output is a folder")
    elif (inside := job_folder_of(output)) is not None:
        problems.append(f"{output}: output lies inside the job folder {inside}, which is "
                        f"removed when that job finishes; choose another folder")
    elif (too_long := name_problem(output)) is not None:
        problems.append(too_long)
    elif (job.exists() or job.is_symlink()) and not job.is_dir():
        problems.append(f"{job}: the job folder of {output.name} exists but is not a folder; "
                        f"move it away")
    elif output.exists() and not output_may_exist:
        problems.append(f"{output}: output exists (use --force to overwrite)")
    try:
        if output.resolve() in (audio.resolve(), image.resolve()):
            problems.append(f"{output}: output would overwrite an input")
    except (OSError, RuntimeError):  # a symlink loop among the inputs: reported above
        pass
    return problems


def check_audio(audio: Path) -> None:
    """InputError unless `audio` has an audio stream (it says what the file is instead)."""
    info = streams.probe(audio)
    if info.first("audio") is None:
        if info.format.endswith("_pipe") or info.format.startswith("image2"):
            kind = "not an audio file (it is an image)"
        elif info.first("video") is not None:
            kind = "a video file with no audio stream"
        else:
            kind = "not an audio file (no audio stream)"
        raise InputError(f"{audio}: {kind}")


def frame_size(engine: Engine, src_w: int, src_h: int) -> tuple[int, int]:
    """(width, height) `engine` renders a src_w x src_h portrait at, for its preset's size."""
    return engine.frame_size(parse_size(engine.preset.size), src_w, src_h)


def analyse_and_plan(audio: Path, preset: Preset, width: int,
                     height: int) -> tuple[analysis.AudioFeatures, Plan]:
    """The audio's features (one streaming decode) and the batch plan at this frame size."""
    feats = analysis.analyse(audio, preset.fps)
    if feats.frames == 0:
        raise InputError(f"{audio}: audio has zero length")
    plan = make_plan(feats.frames, fps=preset.fps, width=width, height=height,
                     infer_frames=preset.infer_frames, clips_per_batch=preset.clips_per_batch,
                     loudness_db=feats.db)
    return feats, plan
