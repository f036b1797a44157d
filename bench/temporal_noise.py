"""Temporal noise inside a swapped face: how much its pixels flicker from frame to frame.

On a still clip (`livefuse clip --static`: no motion, only sensor noise) every change of a
pixel over time is noise. The face is where the swap changed the mean frame by more than
`--threshold` levels; the figure is each pixel's standard deviation over time (frames
after `--settle`), averaged over the face, for the input and for each swapped output.

    .venv/bin/python bench/temporal_noise.py --input still.mp4 --output old=a.mp4 --output new=b.mp4
"""

from __future__ import annotations

import argparse
import json

import av
import numpy as np


def frames(path: str) -> np.ndarray:
    with av.open(path) as container:
        return np.stack(
            [f.to_ndarray(format="bgr24").astype(np.float32) for f in container.decode(video=0)]
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="the still clip that was swapped")
    parser.add_argument("--output", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--threshold", type=float, default=8.0)
    parser.add_argument("--settle", type=int, default=15)
    args = parser.parse_args()
    still = frames(args.input)
    outputs = {name: frames(path) for name, path in (o.split("=", 1) for o in args.output)}
    changed = np.zeros(still.shape[1:3], dtype=bool)
    for video in outputs.values():
        changed |= np.abs(video.mean(axis=0) - still.mean(axis=0)).max(axis=2) > args.threshold
    result = {"face_pixels": int(changed.sum())}
    for name, video in {"input": still, **outputs}.items():
        spread = video[args.settle :].std(axis=0).mean(axis=2)
        result[name] = round(float(spread[changed].mean()), 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
