"""`run_batch`: many videos from one CSV or YAML manifest, one row at a time.

Every row is checked before anything renders and all problems are reported together; a bad
or failing row is recorded and the rest go on. Rows whose output is already current (made
by this tool from the same inputs and settings) are skipped, so a nightly rerun only does
new work.
"""

from __future__ import annotations

import csv
import difflib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from avatarcli import presets
from avatarcli.errors import AvatarError, BusyError, EnvironmentProblem, ExitStatus, InputError
from avatarcli.inputs import default_output, path_problems
from avatarcli.pipeline import Events, GenerateOptions, generate, output_is_current
from avatarcli.resident import ResidentPool
from avatarcli.runner import Executor, cancel_all

COLUMNS = ("audio", "image", "output", "preset", "prompt", "set")


@dataclass
class Row:
    where: str  # "manifest.csv:3": where the row is, for messages
    audio: Path
    image: Path
    output: Path
    preset: str | None = None
    prompt: str | None = None
    overrides: list[str] = field(default_factory=list)  # --set style KEY=VALUE
    problem: str | None = None  # found by validation: the row is not rendered
    resolved: presets.ResolvedPreset | None = None


@dataclass
class RowResult:
    where: str
    output: str
    status: str  # done, skipped, failed, busy
    reason: str = ""
    exit_code: int = 0
    seconds: float = 0.0
    check: dict[str, Any] = field(default_factory=dict)  # `avatar check` figures, model engines

    def to_dict(self) -> dict[str, Any]:
        return vars(self).copy()


def load_manifest(path: Path) -> list[Row]:
    """Rows of a CSV (header: audio,image[,output,preset,prompt,set]) or YAML manifest."""
    if not path.is_file():
        raise InputError(f"{path}: manifest not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read manifest ({exc})") from exc
    if "\0" in text:  # Python's csv reads NUL bytes into file names; no text file has them
        line = text.count("\n", 0, text.index("\0")) + 1
        raise InputError(f"{path}:{line}: not a text manifest (it contains a NUL byte)")
    if path.suffix.lower() in (".yaml", ".yml"):
        records = _yaml_records(path, text)
    else:
        records = _csv_records(path, text)
    if not records:
        raise InputError(f"{path}: manifest has no rows")
    base = path.parent
    return [_row(where, rec, base) for where, rec in records]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _csv_records(path: Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    reader = csv.DictReader(text.splitlines())
    try:
        return _csv_rows(path, reader)
    except csv.Error as exc:  # a NUL byte, a field over the csv module's limit, bad quoting
        raise InputError(f"{path}:{reader.line_num}: not a readable CSV row ({exc})") from None


def _csv_rows(path: Path, reader: csv.DictReader[str]) -> list[tuple[str, dict[str, Any]]]:
    header = [h.strip() for h in reader.fieldnames or []]
    for name in header:
        if name not in COLUMNS:
            hint = difflib.get_close_matches(name, COLUMNS, n=1)
            maybe = f"; did you mean '{hint[0]}'?" if hint else ""
            raise InputError(f"{path}:1: unknown column '{name}'{maybe} "
                             f"(columns: {', '.join(COLUMNS)})")
    for need in ("audio", "image"):
        if need not in header:
            raise InputError(f"{path}:1: the header needs an '{need}' column")
    out = []
    for rec in reader:
        clean = {k.strip(): (v or "").strip() for k, v in rec.items() if k is not None}
        if not any(clean.values()):
            continue
        clean["set"] = [s.strip() for s in clean.get("set", "").split(";") if s.strip()]
        out.append((f"{path}:{reader.line_num}", clean))
    return out


def _yaml_records(path: Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    data = presets.load_yaml(text, path)
    if isinstance(data, dict) and "rows" in data:
        data = data["rows"]
    if not isinstance(data, list):
        raise InputError(f"{path}: a manifest is a list of rows (mappings with audio and image)")
    out = []
    for i, rec in enumerate(data, start=1):
        where = f"{path}: row {i}"
        if not isinstance(rec, dict):
            raise InputError(f"{where}: a row must be a mapping, got {_short(rec)}")
        unknown = [k for k in rec if k not in COLUMNS]
        if unknown:
            raise InputError(f"{where}: unknown key '{unknown[0]}' (keys: {', '.join(COLUMNS)})")
        sets = rec.get("set") or []
        if isinstance(sets, dict):
            sets = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
                    for k, v in sets.items()]
        elif isinstance(sets, str):
            sets = [s.strip() for s in sets.split(";") if s.strip()]
        elif not (isinstance(sets, list) and all(isinstance(s, str) for s in sets)):
            raise InputError(f"{where}: 'set' must be a mapping of keys to values (or a list "
                             f"of KEY=VALUE), got {_short(sets)}")
        rec = {**{k: "" if v is None else v for k, v in rec.items()}, "set": list(sets)}
        out.append((where, rec))
    return out


def _row(where: str, rec: dict[str, Any], base: Path) -> Row:
    def path(value: Any) -> Path:
        p = Path(str(value)).expanduser()
        return p if p.is_absolute() else base / p

    audio, image = str(rec.get("audio") or ""), str(rec.get("image") or "")
    row = Row(where=where, audio=path(audio), image=path(image), output=Path(),
              preset=str(rec["preset"]) if rec.get("preset") else None,
              prompt=str(rec["prompt"]) if rec.get("prompt") else None,
              overrides=[str(s) for s in rec.get("set", [])])
    row.output = path(rec["output"]) if rec.get("output") else default_output(row.audio)
    if not audio or not image:
        row.problem = "needs both 'audio' and 'image'"
    return row


def validate(rows: list[Row], *, preset: str | None, overrides: list[str]) -> list[str]:
    """Cheap checks of every row (files, presets, outputs); marks bad rows, returns problems."""
    seen: dict[Path, str] = {}
    problems = []
    for row in rows:
        if row.problem is None:
            row.problem = _check(row, preset, overrides, seen)
        if row.problem is not None:
            problems.append(f"{row.where}: {row.problem}")
    return problems


def _check(row: Row, preset: str | None, overrides: list[str],
           seen: dict[Path, str]) -> str | None:
    # The checks of `avatar gen`; an existing output is the row's to skip or redo.
    problems = path_problems(row.audio, row.image, row.output, output_may_exist=True)
    if problems:
        return problems[0]
    key = row.output.resolve()
    if key in seen:
        return f"{row.output}: same output as {seen[key]}"
    seen[key] = row.where
    try:
        sets = presets.parse_set([*overrides, *row.overrides])
        resolved = presets.resolve(row.preset or preset, sets, prompt=row.prompt)
    except InputError as exc:
        return str(exc)
    row.resolved = resolved
    return None


def run_batch(rows: list[Row], options: GenerateOptions | None = None, *,
              events: Events | None = None,
              row_events: Callable[[Row], Events] | None = None,
              on_result: Callable[[RowResult], None] | None = None,
              executor: Executor | None = None, rows_at_once: int = 1) -> list[RowResult]:
    """Render each valid row; record failures and go on. Interruptions stop the batch.

    `options` apply to every row (`force`: render rows whose output is current again);
    `rows_at_once` > 1 renders several rows at the same time (on a cluster executor); results
    keep the manifest's order.
    """
    options = options or GenerateOptions()
    events = events or Events()
    lock = threading.Lock()
    # Rows whose settings load the same model share resident workers (one load for many rows).
    workers = ResidentPool() if executor is None else None

    def one(row: Row) -> RowResult:
        started = time.monotonic()
        result = _one(row, options, events=row_events(row) if row_events else events, executor=executor,
                      pool=workers)
        result.seconds = round(time.monotonic() - started, 2)
        if on_result is not None:
            with lock:
                on_result(result)
        return result

    try:
        if rows_at_once <= 1:
            return [one(row) for row in rows]
        pool = ThreadPoolExecutor(max_workers=rows_at_once, thread_name_prefix="row")
        try:
            return list(pool.map(one, rows))
        except BaseException:  # a signal: stop every row's batches, not only this thread's
            cancel_all()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        if workers is not None:
            workers.close()


def _one(row: Row, options: GenerateOptions, *, events: Events, executor: Executor | None, pool: ResidentPool | None) -> RowResult:
    out = str(row.output)
    if row.problem is not None or row.resolved is None:
        return RowResult(row.where, out, "failed", row.problem or "invalid row", 2)
    if row.output.exists() and not options.force:
        if output_is_current(row.output, row.audio, row.image, row.resolved.preset):
            return RowResult(row.where, out, "skipped", "output is current")
        return RowResult(row.where, out, "failed", "output exists, made from other inputs or "
                         "settings (use --redo to render it again)", 2)
    try:
        result = generate(row.audio, row.image, row.resolved, output=row.output,
                          options=options, events=events,
                          executor=None if executor is None else executor.for_row(
                              row.resolved.preset),
                          pool=pool)
    except BusyError as exc:
        return RowResult(row.where, out, "busy", str(exc), exc.exit_code)
    except EnvironmentProblem:  # the machine (a full disk): every other row would fail too
        raise
    except AvatarError as exc:
        if exc.exit_code >= 128:  # interrupted: stop the whole batch
            raise
        return RowResult(row.where, out, "failed", str(exc).splitlines()[0], exc.exit_code)
    return RowResult(row.where, out, "done", check=result.check)


def exit_code(results: list[RowResult]) -> int:
    """FAILED (1) if any row failed, else BUSY (75) if any was busy, else OK."""
    if any(r.status == "failed" for r in results):
        return ExitStatus.FAILED
    if any(r.status == "busy" for r in results):
        return ExitStatus.BUSY
    return ExitStatus.OK
