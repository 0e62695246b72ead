from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import fixtures  # noqa: E402  (scripts/fixtures.py: offline speech and portraits)


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Generated inputs shared by the suite: speech of several lengths, portraits, bad files."""
    d = tmp_path_factory.mktemp("media")
    out = {
        "speech6": fixtures.speech_track(d / "speech6.wav", seconds=6.0, seed=1),
        "speech30": fixtures.speech_track(d / "speech30.wav", seconds=30.0, seed=2),
        "portrait": fixtures.portrait(d / "portrait.png", size=384),
    }
    out.update(fixtures.portrait_variants(d / "portraits"))
    out.update(fixtures.bad_files(d / "bad"))
    return out


@pytest.fixture(autouse=True)
def isolated_presets(tmp_path_factory: pytest.TempPathFactory,
                     monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No test sees (or writes) the developer's own presets and history."""
    monkeypatch.setenv("AVATARCLI_PRESETS_DIR", str(tmp_path_factory.mktemp("no-user-presets")))
    monkeypatch.setenv("AVATARCLI_STATE_DIR", str(tmp_path_factory.mktemp("state")))
    yield
