"""Inputs and the identity verdict for bench/whip_bench.py.

    python -m bench.whip_identity inputs --out DIR     # DIR/source.png, DIR/target.png
    python -m bench.whip_identity judge --out DIR --frames FRAMES_DIR [--json RESULT.json]

`inputs` writes the source face (t1_3 of insightface's t1.jpg, as the identity evaluation
crops it) and the target picture the clip is made from (scikit-image's astronaut, centred
on a 16:9 canvas so the clip frames her face at about 240 px, like a webcam). `judge`
asks an independent recogniser (dlib, tests/identity.py) whether the frames that came back
over WebRTC show the source: per frame, the face's distance to the source must be under
0.6 and under its distance to the target as it was. With `--json`, the verdict is added
to the bench's result file under "identity".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2

from bench.identity_eval import build_identities, load_photos
from tests.identity import SAME_PERSON_THRESHOLD, DlibRecognizer
from tests.media import widescreen

SOURCE = "t1_3"


def make_inputs(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    photos = load_photos()
    people = {p.name: p for p in build_identities(DlibRecognizer(), photos)}
    cv2.imwrite(str(out / "source.png"), people[SOURCE].image)
    cv2.imwrite(str(out / "target.png"), widescreen(photos["astronaut"]))
    print(f"wrote {out / 'source.png'} ({SOURCE}) and {out / 'target.png'} (astronaut)")


def judge(out: Path, frames: Path) -> dict[str, object]:
    recognizer = DlibRecognizer()
    source = cv2.imread(str(out / "source.png"))
    target = cv2.imread(str(out / "target.png"))
    (_, source_descriptor), *_ = recognizer.descriptors(source)
    (_, target_descriptor), *_ = recognizer.descriptors(target)
    rows = []
    for path in sorted(frames.glob("*.png")):
        found = recognizer.descriptors(cv2.imread(str(path)))
        if not found:
            rows.append({"frame": path.name, "found": False, "passed": False})
            continue
        box, descriptor = max(found, key=lambda f: (f[0][2] - f[0][0]) * (f[0][3] - f[0][1]))
        d_source = recognizer.distance(descriptor, source_descriptor)
        d_target = recognizer.distance(descriptor, target_descriptor)
        passed = d_source < SAME_PERSON_THRESHOLD and d_source < d_target
        rows.append(
            {
                "frame": path.name,
                "found": True,
                "d_source": round(d_source, 3),
                "d_target": round(d_target, 3),
                "passed": passed,
            }
        )
    passed = sum(1 for r in rows if r["passed"])
    return {
        "recogniser": "dlib ResNet (face_recognition_models)",
        "rule": "d(frame, source) < 0.6 and < d(frame, target before the swap)",
        "source": SOURCE,
        "target": "astronaut",
        "frames": len(rows),
        "passed": passed,
        "rows": rows,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("inputs", "judge"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--frames", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.action == "inputs":
        make_inputs(args.out)
        return 0
    if args.frames is None:
        parser.error("judge needs --frames")
    verdict = judge(args.out, args.frames)
    print(f"identity: {verdict['passed']}/{verdict['frames']} returned frames read as {SOURCE}")
    for row in verdict["rows"]:  # type: ignore[attr-defined]
        print(f"  {row}")
    if args.json:
        result = json.loads(args.json.read_text())
        result["identity"] = verdict
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
