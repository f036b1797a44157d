"""`livefuse clip` and `livefuse bench` end to end: a real clip, real models, the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from livefuse.cli.main import main


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = main([*map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def group_clip(tmp_path_factory: pytest.TempPathFactory, group_path_module: Path) -> Path:
    """Two seconds of t1.jpg (six people) panning and rolling, 640x360."""
    path = tmp_path_factory.mktemp("clips") / "group.mp4"
    code = main(
        ["clip", "--photo", str(group_path_module), "--output", str(path)]
        + ["--seconds", "2", "--size", "640x360"]
    )
    assert code == 0 and path.is_file()
    return path


@pytest.fixture(scope="module")
def group_path_module(testdata_dir: Path) -> Path:
    return testdata_dir / "t1.jpg"


@pytest.mark.parametrize("mode", ["paced", "unpaced"])
def test_bench_writes_the_design_json(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    group_clip: Path,
    hanks_path: Path,
    mode: str,
) -> None:
    out = tmp_path / "bench.json"
    extra = ["--unpaced"] if mode == "unpaced" else []
    code, table, _ = run(
        capsys, "bench", "--source", hanks_path, "--video", group_clip, "--json", out, *extra
    )
    assert code == 0
    assert "latency p50 / p95 / p99" in table
    result = json.loads(out.read_text())
    for key in (
        "device", "backend", "video", "frames_out", "fps", "dropped_frames", "latency_ms",
        "stages_ms", "faces_per_frame", "swapped_faces_per_frame", "quality_levels",
    ):  # fmt: skip
        assert key in result, key
    assert result["backend"] == "cpu" and result["mode"] == mode
    assert result["video"] == {"width": 640, "height": 360, "fps": 30.0, "frames": 60}
    assert result["frames_out"] + result["dropped_frames"] == 60
    assert sum(result["quality_levels"].values()) == result["frames_out"]
    assert set(result["latency_ms"]) == {"p50", "p95", "p99"}
    assert result["latency_ms"]["p50"] <= result["latency_ms"]["p99"]
    assert {"track", "swap"} <= set(result["stages_ms"])
    # Six people in the photo; at 640x360 the smallest faces fall below the detector.
    assert 2.0 <= result["faces_per_frame"] <= 6.0
    assert 0 < result["swapped_faces_per_frame"] <= result["faces_per_frame"]
    assert result["errors"] == {}


def test_bench_pinned_quality_is_the_only_level(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, group_clip: Path, hanks_path: Path
) -> None:
    out = tmp_path / "bench.json"
    code, _, _ = run(
        capsys, "bench", "--source", hanks_path, "--video", group_clip, "--json", out,
        "--quality", "fast", "--unpaced",
    )  # fmt: skip
    assert code == 0
    assert list(json.loads(out.read_text())["quality_levels"]) == ["fast"]


def test_bench_bad_inputs_get_one_line_and_status_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, group_clip: Path, hanks_path: Path
) -> None:
    code, _, err = run(capsys, "bench", "--source", hanks_path, "--video", tmp_path / "no.mp4")
    assert code == 2 and "cannot open the video" in err

    not_video = tmp_path / "text.mp4"
    not_video.write_text("not a video")
    code, _, err = run(capsys, "bench", "--source", hanks_path, "--video", not_video)
    assert code == 2 and "text.mp4" in err

    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((200, 200, 3), 128, np.uint8))
    code, _, err = run(capsys, "bench", "--source", blank, "--video", group_clip)
    assert code == 2 and "no face found" in err


def test_clip_rejects_bad_arguments(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, hanks_path: Path
) -> None:
    code, _, err = run(capsys, "clip", "--photo", hanks_path, "--output", tmp_path / "c.avi")
    assert code == 2 and ".mp4 or .y4m" in err
    code, _, err = run(
        capsys, "clip", "--photo", hanks_path, "--output", tmp_path / "c.y4m", "--size", "641x360"
    )
    assert code == 2 and "even" in err
    code, _, err = run(
        capsys, "clip", "--photo", tmp_path / "none.jpg", "--output", tmp_path / "c.y4m"
    )
    assert code == 2 and "photo" in err


def test_bench_streams_reports_the_aggregate(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, group_clip: Path, hanks_path: Path
) -> None:
    out = tmp_path / "bench.json"
    code, table, _ = run(
        capsys, "bench", "--source", hanks_path, "--video", group_clip, "--json", out,
        "--streams", "2", "--quality", "fast",
    )  # fmt: skip
    assert code == 0 and "aggregate fps" in table
    result = json.loads(out.read_text())
    assert result["streams"] == 2 and len(result["per_stream"]) == 2
    assert result["frames_out"] + result["dropped_frames"] == 120
    assert sum(s["frames_out"] for s in result["per_stream"]) == result["frames_out"]
    total = sum(s["fps"] for s in result["per_stream"])
    assert abs(result["aggregate_fps"] - total) <= 0.1 * total
    with pytest.raises(SystemExit):  # argparse: "must be 1 or more"
        main(["bench", "--source", str(hanks_path), "--video", str(group_clip), "--streams", "0"])
    assert "must be 1 or more" in capsys.readouterr().err
