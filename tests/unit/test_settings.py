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


def test_swap_processes_follow_the_cores_a_cgroup_allows(tmp_path: Path) -> None:
    from livefuse.settings import _cpu_quota_cores

    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("250000 100000\n")  # a container limited to 2.5 cores
    assert _cpu_quota_cores(cpu_max) == 2.5
    cpu_max.write_text("max 100000\n")  # no limit
    assert _cpu_quota_cores(cpu_max) is None
    assert _cpu_quota_cores(tmp_path / "absent") is None
    assert Settings(swap_processes=0).resolved_swap_processes == 0
    assert Settings(swap_processes=3).resolved_swap_processes == 3
    assert 0 <= Settings().resolved_swap_processes <= 8


def test_a_bad_swap_process_count_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from livefuse.cli.main import main

    for value in ("-1", "many"):
        monkeypatch.setenv("LIVEFUSE_SWAP_PROCESSES", value)
        assert main(["models", "list"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("livefuse: invalid settings: LIVEFUSE_SWAP_PROCESSES")
        assert len(err.splitlines()) == 1
