"""Settings come from LIVEFUSE_* variables and cannot change once built."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from livefuse.settings import Settings


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HOME", "THREADS", "MAX_IMAGE_PIXELS", "MAX_IMAGE_BYTES"):
        monkeypatch.delenv(f"LIVEFUSE_{name}", raising=False)
    settings = Settings()
    assert settings.home == Path.home() / ".cache" / "livefuse"
    assert settings.models_dir == settings.home / "models"
    assert settings.testdata_dir == settings.home / "testdata"
    assert settings.threads >= 1
    assert settings.max_image_pixels == 40_000_000
    assert settings.max_image_bytes == 50 * 1024 * 1024


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LIVEFUSE_HOME", str(tmp_path))
    monkeypatch.setenv("LIVEFUSE_THREADS", "3")
    monkeypatch.setenv("LIVEFUSE_MAX_IMAGE_PIXELS", "1000")
    settings = Settings()
    assert settings.models_dir == tmp_path / "models"
    assert (settings.threads, settings.max_image_pixels) == (3, 1000)


def test_home_expands_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEFUSE_HOME", "~/elsewhere")
    assert Settings().home == Path.home() / "elsewhere"


def test_frozen_and_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(threads=2)
    with pytest.raises(ValidationError):
        settings.threads = 4
    with pytest.raises(ValidationError):
        Settings(threads=0)
