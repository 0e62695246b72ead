from __future__ import annotations

from pathlib import Path

import pytest

from avatarcli import presets
from avatarcli.errors import InputError

BUILTIN = ["cpu-preview", "liveavatar-24gb", "liveavatar-32gb", "liveavatar-48gb",
           "liveavatar-48gb-fp8", "liveavatar-5x80gb",
           "liveavatar-80gb"]


@pytest.fixture(autouse=True)
def user_presets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "user-presets"
    folder.mkdir()
    monkeypatch.setenv(presets.ENV_DIR, str(folder))
    return folder


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_presets_load_and_validate(name: str) -> None:
    resolved = presets.resolve(name)
    assert resolved.origin == "built-in"
    assert resolved.preset.description
    assert presets.to_yaml(resolved.preset).startswith("engine:")


def test_builtin_values_mirror_gpu_budgets() -> None:
    p24 = presets.resolve("liveavatar-24gb").preset
    assert (p24.size, p24.offload, p24.online_decode) == ("384*256", True, True)
    assert p24.infer_frames < 48
    assert (p24.liveavatar.resident_blocks, p24.liveavatar.weight_storage) == (20, "int8")
    assert p24.clips_per_batch < presets.resolve("liveavatar-80gb").preset.clips_per_batch
    assert presets.resolve("liveavatar-48gb-fp8").preset.liveavatar.fp8
    assert presets.resolve("liveavatar-5x80gb").preset.liveavatar.gpus_per_run == 5
    assert presets.resolve(None).preset.engine == "builtin"


def test_user_preset_wins_and_may_extend_the_builtin(user_presets: Path) -> None:
    (user_presets / "cpu-preview.yaml").write_text("extends: cpu-preview\nseed: 7\n")
    resolved = presets.resolve("cpu-preview")
    assert resolved.preset.seed == 7
    assert resolved.preset.builtin.x264_preset == "ultrafast"  # inherited from the built-in
    assert resolved.origin.endswith("cpu-preview.yaml")
    rows = {r["name"]: r for r in map(presets.describe, presets.available().values())}
    assert rows["cpu-preview"]["origin"].endswith("cpu-preview.yaml")


def test_extends_chain_and_sections_merge(user_presets: Path) -> None:
    (user_presets / "mine.yaml").write_text(
        "extends: liveavatar-48gb-fp8\nliveavatar:\n  repo: /opt/LiveAvatar\n")
    p = presets.resolve("mine").preset
    assert p.liveavatar.fp8 and p.liveavatar.repo == "/opt/LiveAvatar"
    assert p.size == "704*384"


def test_set_beats_preset_and_reaches_sections() -> None:
    over = presets.parse_set(["infer_frames=24", "liveavatar.repo=/opt/x y",
                              "liveavatar.env={ENABLE_COMPILE: false}", "seed=1"])
    p = presets.resolve("liveavatar-80gb", over).preset
    assert p.infer_frames == 24 and p.seed == 1
    assert p.liveavatar.repo == "/opt/x y"
    assert p.liveavatar.env == {"ENABLE_COMPILE": "false"}


def test_preset_file_by_path(tmp_path: Path) -> None:
    f = tmp_path / "custom.yaml"
    f.write_text("extends: cpu-preview\nsize: 384*384\n")
    resolved = presets.resolve(str(f))
    assert resolved.preset.size == "384*384" and resolved.name == "custom"


@pytest.mark.parametrize(("content", "message"), [
    ("size: [1, 2\n", r"bad\.yaml:2: YAML syntax error"),
    ("- a\n- b\n", r"must be a mapping.*not a list"),
    ("infer_frame: 48\n", r"unknown key 'infer_frame'; did you mean 'infer_frames'"),
    ("liveavatar:\n  rpo: /x\n", r"unknown key 'liveavatar.rpo'; did you mean 'liveavatar.repo'"),
    ("infer_frames: 1000\n", r"infer_frames must be within \[4, 240\], got 1000"),
    ("infer_frames: '48'\n", r"infer_frames must be an integer, got '48'"),
    ("offload: yes please\n", r"offload must be true or false"),
    ("engine: magic\n", r"engine must be one of builtin, liveavatar, command, got 'magic'"),
    ("size: big\n", r"size must be an area key like 512\*512"),
    ("size: 10*10\n", r"size sides must be within \[64, 4096\]"),
    ("engine: liveavatar\nsize: 512*512\n", r"one of LiveAvatar's area keys"),
    ("engine: liveavatar\nsize: 704*384\nsample_steps: 40\n", r"sample_steps must be within \[1, 4\]"),
    ("builtin: 3\n", r"'builtin' must be a mapping"),
    ("extends: bad\n", r"refers to itself|loops back"),
    ("extends: nowhere\n", r"unknown preset 'nowhere'"),
])
def test_preset_errors_name_the_problem(tmp_path: Path, content: str, message: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(content)
    with pytest.raises(InputError, match=message):
        presets.resolve(str(f))


def test_unknown_preset_lists_available() -> None:
    with pytest.raises(InputError, match=r"unknown preset 'cpu-previw' \(did you mean "
                                         r"'cpu-preview'\?\); available: cpu-preview, "):
        presets.resolve("cpu-previw")


def test_set_errors_say_set() -> None:
    with pytest.raises(InputError, match=r"^--set: clips_per_batch must be within"):
        presets.resolve("cpu-preview", presets.parse_set(["clips_per_batch=0"]))
    with pytest.raises(InputError, match="expected KEY=VALUE"):
        presets.parse_set(["novalue"])
    with pytest.raises(InputError, match="at most one dot"):
        presets.parse_set(["a.b.c=1"])


def test_broken_user_preset_is_listed_with_its_error(user_presets: Path) -> None:
    (user_presets / "broken.yaml").write_text("size: [\n")
    rows = {r["name"]: r for r in map(presets.describe, presets.available().values())}
    assert rows["broken"]["description"].startswith("error:")
    assert "cpu-preview" in rows
