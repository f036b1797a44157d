"""Per-stage time per face of the still-image pipeline (`livefuse swap`'s), on the pinned photos.

    .venv/bin/python -m bench.stage_times --json bench/results/stage_times-cpu-2core.json

Each image is swapped with the Hanks crop as the source (every face, shape transfer on,
full-resolution blend: what `livefuse swap` does), a few warm-up runs first, then the
`StageTimer` of `FacePipeline` is read over the timed runs: detection per image, the
other stages per face.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from livefuse.cli.bench import device_description
from livefuse.engines.pipeline import FacePipeline, StageTimer
from livefuse.engines.store import ModelStore
from livefuse.settings import Settings

_WARMUP_RUNS = 3


def _images(testdata: Path) -> dict[str, np.ndarray]:
    from skimage import data

    t1 = cv2.imread(str(testdata / "t1.jpg"))
    if t1 is None:
        raise SystemExit(f"stage_times: {testdata / 't1.jpg'} is missing; run `make install`")
    return {"t1.jpg": t1, "astronaut": np.ascontiguousarray(data.astronaut()[:, :, ::-1])}


def measure(
    pipeline: FacePipeline, source_bgr: np.ndarray, image: np.ndarray, runs: int
) -> dict[str, Any]:
    source = pipeline.prepare_source(source_bgr).face
    for _ in range(_WARMUP_RUNS):
        pipeline.swap_faces(image, source, pipeline.find_faces(image))
    pipeline.timer = StageTimer()
    started = time.perf_counter()
    faces = 0
    for _ in range(runs):
        meshes = pipeline.find_faces(image)
        faces = len(meshes)
        pipeline.swap_faces(image, source, meshes)
    whole_ms = (time.perf_counter() - started) * 1000 / runs
    per_item = pipeline.timer.per_item_ms()
    return {
        "size": [int(image.shape[1]), int(image.shape[0])],
        "faces": faces,
        "face_px": [round(m.size) for m in pipeline.find_faces(image)],
        "whole_image_ms": round(whole_ms, 2),
        "per_image_ms": {"detect": round(per_item.get("detect", 0.0), 2)},
        "per_face_ms": {
            stage: round(per_item[stage], 2)
            for stage in ("landmarks", "swap", "blend")
            if stage in per_item
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stage_times", description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    settings = Settings()
    pipeline = FacePipeline.from_store(ModelStore(settings.models_dir), threads=args.threads)
    source = cv2.imread(str(settings.testdata_dir / "Tom_Hanks_54745.png"))
    if source is None:
        raise SystemExit("stage_times: the Hanks test photo is missing; run `make install`")
    results = {
        name: measure(pipeline, source, image, args.runs)
        for name, image in _images(settings.testdata_dir).items()
    }
    print(f"{'image':<10} {'faces':>5} {'whole ms':>9} {'detect/img':>10}  per face ms")
    for name, row in results.items():
        per_face = ", ".join(f"{k} {v}" for k, v in row["per_face_ms"].items())
        print(
            f"{name:<10} {row['faces']:>5} {row['whole_image_ms']:>9} "
            f"{row['per_image_ms']['detect']:>10}  {per_face}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "command": "python -m bench.stage_times " + " ".join(sys.argv[1:]),
            "device": device_description(),
            "threads": args.threads,
            "runs": args.runs,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "images": results,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
