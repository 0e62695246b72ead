"""Preset resolution: built-in YAML files, a user directory that wins over them, `extends:`,
then `--set KEY=VALUE` overrides, validated against the dataclasses in `options.py`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from avatarcli import engines
from avatarcli.errors import InputError
from avatarcli.options import CORE_SECTIONS, RUNG_FORBIDDEN_KEYS, Preset

DEFAULT_PRESET = "cpu-preview"
ENV_DIR = "AVATARCLI_PRESETS_DIR"
SIZE_RE = re.compile(r"^(\d+)\*(\d+)$")
SIZE_BOUNDS = (64, 4096)


@dataclass(frozen=True)
class ResolvedPreset:
    name: str
    origin: str  # "built-in", or the user file it came from
    preset: Preset


@dataclass(frozen=True)
class PresetInfo:
    name: str
    origin: str
    path: Path


def user_dir() -> Path:
    """$AVATARCLI_PRESETS_DIR, else $XDG_CONFIG_HOME/avatarcli/presets (~/.config by default)."""
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(xdg) / "avatarcli" / "presets"


def _builtin_dir() -> Path:
    return Path(str(resources.files("avatarcli") / "builtin_presets"))


def available() -> dict[str, PresetInfo]:
    """Every preset by name; a user file shadows a built-in one of the same name."""
    found: dict[str, PresetInfo] = {}
    for origin, folder in (("built-in", _builtin_dir()), ("user", user_dir())):
        if not folder.is_dir():
            continue
        for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
            if path.is_file():  # a FIFO named like a preset would block `avatar presets`
                found[path.stem] = PresetInfo(path.stem, origin, path)
    return dict(sorted(found.items()))


def _looks_like_file(ref: str) -> bool:
    return ref.endswith((".yaml", ".yml")) or os.sep in ref or "/" in ref


MAX_YAML_NODES = 100_000  # nodes after expanding aliases; a real preset or manifest has far fewer


def load_yaml(text: str, path: Path) -> Any:
    """`yaml.safe_load` with the expansion of aliases bounded.

    An alias is cheap to write and, nested, expands exponentially ("billion laughs"): any
    later walk of the data (a merge, a message quoting a value) would run until memory runs
    out. The node tree is counted as it would expand, before anything is built from it.
    """
    try:
        return _bounded_load(text, str(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"{where}: YAML syntax error: {problem}") from exc


def _bounded_load(text: str, where: str) -> Any:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _count_nodes(node, where)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _count_nodes(root: yaml.Node, where: str) -> None:
    seen = 0
    stack = [root]
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_YAML_NODES:
            raise InputError(f"{where}: YAML expands to more than {MAX_YAML_NODES} values "
                             f"(aliases nested in aliases?); refused")
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack.extend((key, value))


MAX_PRESET_BYTES = 1 << 20  # a preset is a few hundred bytes; more is not a preset


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_PRESET_BYTES:
            raise InputError(f"{path}: not a preset (over {MAX_PRESET_BYTES >> 20} MiB)")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot read preset ({exc.strerror or exc})") from exc
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a preset (not UTF-8 text)") from None
    data = load_yaml(text, path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: a preset must be a mapping of keys to values, "
                         f"not a {type(data).__name__}")
    return data


def _locate(ref: str, base: Path | None = None) -> tuple[str, str, Path]:
    """(name, origin, path) of a preset given by name or by file path."""
    if _looks_like_file(ref):
        path = Path(ref).expanduser()
        if base is not None and not path.is_absolute():
            path = base / path
        if not path.is_file():
            raise InputError(f"{path}: preset file not found")
        return path.stem, str(path), path
    presets = available()
    if ref not in presets:
        names = ", ".join(presets) or "(none)"
        hint = difflib.get_close_matches(ref, presets, n=1)
        maybe = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise InputError(f"unknown preset '{ref}'{maybe}; available: {names}")
    info = presets[ref]
    return info.name, "built-in" if info.origin == "built-in" else str(info.path), info.path


def sections() -> dict[str, type]:
    """Every section a preset may hold: each registered engine's, and `worker`."""
    return {**engines.sections(), **CORE_SECTIONS}


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key in sections():
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _load_raw(ref: str, base: Path | None, seen: tuple[Path, ...]) -> tuple[str, str, dict[str, Any]]:
    name, origin, path = _locate(ref, base)
    if path.resolve() in seen:
        chain = " -> ".join(p.stem for p in (*seen, path))
        raise InputError(f"{path}: 'extends' loops back on itself ({chain})")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return name, origin, data
    if not isinstance(parent, str):
        raise InputError(f"{path}: 'extends' must be a preset name or file, got {parent!r}")
    if parent == name and not _looks_like_file(parent):
        # A user preset may extend the built-in one it shadows.
        builtin = _builtin_dir() / f"{name}.yaml"
        if not builtin.is_file() or builtin.resolve() == path.resolve():
            raise InputError(f"{path}: 'extends: {parent}' refers to itself")
        parent = str(builtin)
    _, _, parent_data = _load_raw(parent, path.parent, (*seen, path.resolve()))
    return name, origin, _merge(parent_data, data)


def parse_set(items: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` items as a nested mapping; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"--set {item!r}: expected KEY=VALUE (e.g. --set infer_frames=48)")
        try:
            value = _bounded_load(raw, f"--set {key}") if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        if len(parts) > 2:
            raise InputError(f"--set {item!r}: keys have at most one dot (section.key)")
        if len(parts) == 2:
            out.setdefault(parts[0], {})
            if not isinstance(out[parts[0]], dict):
                raise InputError(f"--set {item!r}: '{parts[0]}' is not a section")
            out[parts[0]][parts[1]] = value
        else:
            out[key] = value
    return out


def resolve(ref: str | None = None, overrides: dict[str, Any] | None = None, *,
            prompt: str | None = None) -> ResolvedPreset:
    """Load preset `ref` (name or file; default cpu-preview), apply overrides, validate.

    `prompt` (--prompt) goes to the prompt key of the engine the preset uses.
    """
    name, origin, data = _load_raw(ref or DEFAULT_PRESET, None, ())
    where = origin if origin != "built-in" else f"preset '{name}'"
    preset = build(data, where)
    overrides = dict(overrides or {})
    if prompt is not None and engines.engine_class(preset.engine).takes_prompt:
        section = overrides.get(preset.engine)
        overrides[preset.engine] = {**(section if isinstance(section, dict) else {}),
                                    "prompt": prompt}
    if overrides:  # validated apart, so an error names what was wrong: the file or --set
        preset = build(_merge(data, overrides), "--set")
    return ResolvedPreset(name, origin, preset)


def build(data: dict[str, Any], where: str = "preset") -> Preset:
    """Validate a raw mapping into a Preset; every problem names the key, value and valid range."""
    known = sections()
    kwargs = _check_fields(Preset, data, prefix="", where=where, sections=known)
    engine_sections = {}
    for section, cls in known.items():
        raw = data.get(section, {})
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise InputError(f"{where}: '{section}' must be a mapping (a section), got {raw!r}")
        value = cls(**_check_fields(cls, raw, prefix=f"{section}.", where=where))
        if section in CORE_SECTIONS:
            kwargs[section] = value
        else:
            engine_sections[section] = value
    preset = Preset(**kwargs, sections=engine_sections)
    _check_rules(preset, where)
    for k in range(1, len(preset.oom_retry) + 1):
        _check_rung(data, preset.oom_retry, k, where)
    return preset


def rung_values(data: dict[str, Any], rungs: list[dict[str, Any]], k: int) -> dict[str, Any]:
    """The raw preset mapping with retry rungs 1..k applied (each adds to the ones before)."""
    out = data
    for rung in rungs[:k]:
        nested: dict[str, Any] = {}
        for key, value in rung.items():
            section, dot, name = str(key).partition(".")
            if dot:
                nested.setdefault(section, {})[name] = value
            else:
                nested[section] = value
        out = _merge(out, nested)
    return out


def _check_rung(data: dict[str, Any], rungs: list[dict[str, Any]], k: int, where: str) -> None:
    for key in rungs[k - 1]:
        if str(key).partition(".")[0] in RUNG_FORBIDDEN_KEYS:
            raise InputError(f"{where}: oom_retry rung {k} may not change '{key}' (it would "
                             f"change the plan or the video's identity)")
    build({**rung_values(data, rungs, k), "oom_retry": []}, f"{where}, oom_retry rung {k}")


def _check_fields(cls: type, data: dict[str, Any], *, prefix: str, where: str,
                  sections: dict[str, type] | None = None) -> dict[str, Any]:
    sections = sections or {}
    fields = {f.name: f for f in dataclasses.fields(cls)
              if f.name not in sections and not f.metadata.get("section")}
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in sections and not prefix:
            continue
        if key not in fields:
            valid = [*fields, *sections]
            hint = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
            maybe = f"; did you mean '{prefix}{hint[0]}'?" if hint else ""
            raise InputError(f"{where}: unknown key '{prefix}{key}'{maybe}")
        out[key] = _check_value(f"{prefix}{key}", value, hints[key], fields[key].metadata, where)
    return out


def _check_value(key: str, value: Any, hint: Any, meta: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    bad = f"{where}: {key} must be"
    if hint is bool:
        if not isinstance(value, bool):
            raise InputError(f"{bad} true or false, got {value!r}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{bad} an integer, got {value!r}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InputError(f"{bad} a number, got {value!r}")
        value = float(value)
    elif hint is str:
        if isinstance(value, dict | list) or value is None:
            raise InputError(f"{bad} a string, got {value!r}")
        value = str(value)
    elif origin is list and typing.get_args(hint)[0] is not str:  # the retry ladder
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise InputError(f"{bad} a list of mappings (one per rung), got {value!r}")
        value = [dict(v) for v in value]
    elif origin is list:
        if not isinstance(value, list) or any(isinstance(v, dict | list) for v in value):
            raise InputError(f"{bad} a list of strings, got {value!r}")
        value = [str(v) for v in value]
    elif origin is dict:
        if not isinstance(value, dict):
            raise InputError(f"{bad} a mapping of names to strings, got {value!r}")
        value = {str(k): _env_str(v) for k, v in value.items()}
    bounds, choices = meta.get("bounds"), meta.get("choices")
    if bounds is not None and not bounds[0] <= value <= bounds[1]:
        lo, hi = (int(b) if float(b).is_integer() else b for b in bounds)
        raise InputError(f"{where}: {key} must be within [{lo}, {hi}], got {value!r}")
    if choices is not None and value not in choices:
        raise InputError(f"{bad} one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def _env_str(value: Any) -> str:
    # YAML turns `false` into a bool; environment values want the lowercase word back.
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_size(size: str) -> tuple[int, int]:
    """An area key "W*H" as integers (no bounds check)."""
    m = SIZE_RE.match(size.strip())
    if not m:
        raise ValueError(size)
    return int(m.group(1)), int(m.group(2))


def _check_rules(preset: Preset, where: str) -> None:
    try:
        w, h = parse_size(preset.size)
    except ValueError:
        raise InputError(f"{where}: size must be an area key like 512*512, got {preset.size!r}") \
            from None
    lo, hi = SIZE_BOUNDS
    if not (lo <= w <= hi and lo <= h <= hi):
        raise InputError(f"{where}: size sides must be within [{lo}, {hi}], got {preset.size!r}")
    if preset.engine not in engines.names():
        raise InputError(f"{where}: engine must be one of {', '.join(engines.names())}, "
                         f"got {preset.engine!r}")
    for problem in engines.engine_class(preset.engine).validate(preset):
        raise InputError(f"{where}: {problem}")


def to_yaml(preset: Preset) -> str:
    """The preset as YAML, with only the section of the engine it uses (and `worker` for an
    engine that renders in resident workers)."""
    keep = {preset.engine, *(["worker"] if engines.resident(preset) else [])}
    known = sections()
    data = {k: v for k, v in preset.to_dict().items() if k not in known or k in keep}
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def describe(info: PresetInfo) -> dict[str, str]:
    """One row of `avatar presets`; a broken user preset shows its error instead of failing."""
    origin = "built-in" if info.origin == "built-in" else str(info.path)
    try:
        p = resolve(str(info.path)).preset
    except InputError as exc:
        return {"name": info.name, "engine": "?", "size": "?", "description": f"error: {exc}",
                "origin": origin}
    return {"name": info.name, "engine": p.engine, "size": p.size,
            "description": p.description, "origin": origin}
