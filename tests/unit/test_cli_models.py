"""`livefuse models ...` and the CLI's contract, run through `main` in-process and once as
the installed console script."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from livefuse import __version__
from livefuse.cli.main import build_parser, main
from livefuse.engines.registry import MODELS
from livefuse.engines.store import ModelStore


@pytest.fixture
def home_with_models(
    model_store: ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A LIVEFUSE_HOME holding copies of every pulled model."""
    models = tmp_path / "models"
    models.mkdir()
    for name in MODELS:
        shutil.copy2(model_store.path(name), models)
        shutil.copy2(model_store.sidecar(name), models)
    monkeypatch.setenv("LIVEFUSE_HOME", str(tmp_path))
    return tmp_path


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.strip() == f"livefuse {__version__}"


def test_no_command_prints_usage_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "models" in capsys.readouterr().err


def test_models_list_shows_every_model(
    home_with_models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (home_with_models / "models" / "iris_landmark.onnx").unlink()
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for name, spec in MODELS.items():
        line = next(line for line in out.splitlines() if f" {name} " in line)
        assert spec.kind in line and spec.licence in line
        assert spec.source.describe() in line
        assert ("missing" if name == "iris_landmark" else "ok") in line


def test_models_verify_ok(home_with_models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "verify"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(MODELS)
    assert all(line.startswith("ok ") for line in lines)


def test_models_verify_fails_with_one_line_per_model(
    home_with_models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = home_with_models / "models"
    (models / "centerface.onnx").unlink()
    with open(models / "face_landmark.onnx", "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert main(["models", "verify"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(MODELS)
    by_name = {line.split()[1].rstrip(":"): line for line in lines}
    assert by_name["centerface"].startswith("missing")
    assert "livefuse models pull centerface" in by_name["centerface"]
    assert by_name["face_landmark"].startswith("corrupt")
    assert by_name["iris_landmark"].startswith("ok")


def test_models_verify_named_subset(
    home_with_models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (home_with_models / "models" / "centerface.onnx").unlink()
    assert main(["models", "verify", "iris_landmark", "facemesh_topology"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_models_pull_when_present_downloads_nothing(
    home_with_models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "pull"]) == 0
    out = capsys.readouterr().out
    assert out.count("present ") == len(MODELS)


def test_model_error_is_one_line_on_stderr_with_exit_2(
    home_with_models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "pull", "no_such_model"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().count("\n") == 0
    assert "unknown model 'no_such_model'" in captured.err
    assert "Traceback" not in captured.err


def test_invalid_setting_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LIVEFUSE_THREADS", "0")
    assert main(["models", "list"]) == 2
    assert "LIVEFUSE_THREADS" in capsys.readouterr().err


def test_swap_arguments_parse() -> None:
    args = build_parser().parse_args(
        ["swap", "--source", "a.jpg", "--target", "clip.mp4", "--output", "out.mp4"]
    )
    assert (args.command, args.source, args.target, args.output, args.faces) == (
        "swap",
        Path("a.jpg"),
        Path("clip.mp4"),
        Path("out.mp4"),
        "all",
    )
    args = build_parser().parse_args(
        ["swap", "--source", "a", "--target", "b", "--output", "c", "--faces", "largest"]
    )
    assert args.faces == "largest"


def test_console_script_runs(home_with_models: Path) -> None:
    script = Path(sys.executable).with_name("livefuse")
    if not script.exists():
        pytest.fail(f"{script} is missing: run `make install`", pytrace=False)
    done = subprocess.run(
        [str(script), "models", "verify"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("ok ") == len(MODELS)
