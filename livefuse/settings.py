"""Process-wide settings, read from `LIVEFUSE_*` environment variables.

There is no module-level instance: the edge (the CLI, the service) builds one `Settings`
and passes it down, so tests and embedders can hold several side by side.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_home() -> Path:
    return Path.home() / ".cache" / "livefuse"


def _default_threads() -> int:
    # The CPUs this process may run on (a container's or CI's cpuset), not the host's count.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LIVEFUSE_", frozen=True, extra="ignore")

    home: Path = Field(default_factory=_default_home)
    """Root of everything livefuse keeps on disk: models/, testdata/."""

    threads: int = Field(default_factory=_default_threads, ge=1)
    """Intra-op threads for inference runtimes."""

    max_image_pixels: int = Field(default=40_000_000, ge=1)
    """Largest decoded image accepted (width x height)."""

    max_image_bytes: int = Field(default=50 * 1024 * 1024, ge=1)
    """Largest encoded image accepted."""

    @field_validator("home")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def testdata_dir(self) -> Path:
        return self.home / "testdata"
