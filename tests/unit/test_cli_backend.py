"""`--backend auto|cpu|cuda` on `serve`, `swap` and `bench`: each command picks its backend
once, before it reads an input or listens, and one that cannot run here is one line and
exit status 2. (`cpu` and `auto` at work: tests/integration/test_swap_cli.py and
test_bench_cli.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from livefuse.cli.main import main
from livefuse.engines.backend import BACKEND_CHOICES, BackendUnavailable, select_backend

# Each command with its required arguments. None of the files exist, so a run that got past
# the backend would fail on them instead.
COMMAND_LINES = {
    "serve": "serve --port 0",
    "swap": "swap --source {tmp}/face.jpg --target {tmp}/group.jpg --output {tmp}/out.jpg",
    "bench": "bench --source {tmp}/face.jpg --video {tmp}/clip.mp4",
}


def command_line(command: str, tmp_path: Path) -> list[str]:
    return [arg.format(tmp=tmp_path) for arg in COMMAND_LINES[command].split()]


def test_the_choices_are_design_s() -> None:
    assert BACKEND_CHOICES == ("auto", "cpu", "cuda")


@pytest.mark.parametrize("command", sorted(COMMAND_LINES))
def test_unavailable_cuda_is_one_line_and_status_2(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        select_backend("cuda")
    except BackendUnavailable as unavailable:
        reason = str(unavailable)
    else:
        pytest.skip("the cuda backend runs on this machine")
    assert main([*command_line(command, tmp_path), "--backend", "cuda"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [f"livefuse {command}: {reason}"]
    assert "the cuda backend" in reason


@pytest.mark.parametrize("command", sorted(COMMAND_LINES))
@pytest.mark.parametrize("backend", ["tensorrt", "torch", "gpu"])
def test_argparse_refuses_other_names(
    command: str, backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as refused:
        main([*command_line(command, tmp_path), "--backend", backend])
    assert refused.value.code == 2
    assert f"invalid choice: '{backend}'" in capsys.readouterr().err
