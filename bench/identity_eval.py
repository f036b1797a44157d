"""Identity evaluation: do faces swapped by `livefuse swap` read as the source person?

An independent judge (dlib's face recogniser, see tests/identity.py) compares every swapped face
with the source and with the target as it was before the swap. A row PASSES when

    d(swapped, source) < 0.6  and  d(swapped, source) < d(swapped, target before the swap)

i.e. dlib calls it the source person, and it reads as the source more than as whom it replaced.

The evaluation set uses only real photos we may use: scikit-image's astronaut, and from the
pinned insightface 2.1 sdist t1.jpg (six people around a table) and Tom_Hanks_54745.png. Each
person becomes a 256x256 portrait (a crop twice the face's size). Some are sources; every other
person is a target, in variants that make the swap (and the recogniser) work harder: rotated
20 degrees each way, darkened to 45%, small (face ~50 px), lower face covered, mirrored.

Those people are also what the tests use and what the swap was tuned on. `--targets heldout`
swaps the sources onto people never used anywhere else instead: four photos of two people
(Barack Obama three times, Joe Biden once) from the face_recognition 1.3.0 sdist's test
images, in the same variants.

    python -m bench.identity_eval --json out/identity.json --sheet out/identity.png
    python -m bench.identity_eval --sources all --targets heldout
    python -m bench.identity_eval --command 'cp -r {target} {output}'   # stand-in: no swap

Before the numbers for the swap, it prints two baselines that are properties of the data and the
recogniser alone: how far each variant moves the same person (how hard the variant is for dlib
itself), and how far apart targets and sources are before any swap (they are different people).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final, Protocol, TypeVar

import cv2
import numpy as np
from skimage import data as skimage_data

from livefuse.engines.registry import Distribution
from livefuse.engines.store import ModelError, sha256_file
from livefuse.settings import Settings
from tests.fixtures import (
    INSIGHTFACE_IMAGES,
    ImageFixture,
    fetch_images,
    fetch_insightface_images,
)
from tests.identity import (
    SAME_PERSON_THRESHOLD,
    Box,
    Descriptor,
    DlibRecognizer,
    FaceMatch,
    Image,
)

PORTRAIT_SIZE: Final = 256  # every identity's image; its face is then ~128 px wide
SMALL_FACE_PX: Final = 50
DARKEN: Final = 0.45
ROTATION_DEG: Final = 20.0
OCCLUDER_BGR: Final = (196, 164, 112)  # a surgical-mask blue, flat
T1_PEOPLE: Final = 6
# The people in t1.jpg are named t1_1..t1_6 from left to right.
IDENTITIES: Final = ("astronaut", "hanks", *(f"t1_{i}" for i in range(1, T1_PEOPLE + 1)))
DEFAULT_SOURCES: Final = ("astronaut", "t1_1", "hanks")

# The held-out targets: photos of two people no test, fixture or tuning run has used, from
# the test images of the face_recognition 1.3.0 sdist (fetched pinned, never committed).
# `--targets heldout` swaps the sources onto these instead of onto each other.
FACE_RECOGNITION: Final = Distribution(
    package="face-recognition",
    version="1.3.0",
    filename="face_recognition-1.3.0.tar.gz",
    sha256="5e5efdd1686aa566af0d3cc1313b131e4b197657a8ffd03669e6d3fad92705ec",
    size=3_182_249,
    pip_args=("--no-binary=:all:",),
)
_HELDOUT_DIR: Final = "face_recognition-1.3.0/tests/test_images"
HELDOUT_IMAGES: Final = {
    # identity: the photo (obama2.jpg is a speech, obama3.jpg a full-length standing shot
    # whose face is ~60 px; 32bit.png repeats obama2.jpg, and the partial faces are crops
    # of obama.jpg, so neither is used).
    "obama_a": ImageFixture(
        "obama.jpg",
        f"{_HELDOUT_DIR}/obama.jpg",
        "0930e3aa8cae5920329c0c8cbc6a2ab70f47b0e67b432875beaa95cbf7e741f6",
    ),
    "obama_b": ImageFixture(
        "obama2.jpg",
        f"{_HELDOUT_DIR}/obama2.jpg",
        "a7efcc907375274796f39646510704aa86672d59f6d5469d69af3c85590976a6",
    ),
    "obama_c": ImageFixture(
        "obama3.jpg",
        f"{_HELDOUT_DIR}/obama3.jpg",
        "76ac6bf97c36dc2da0ad16a537d6a5ac1b10f48d49aac29a0cca9a17cdbc3ca3",
    ),
    "biden": ImageFixture(
        "biden.jpg",
        f"{_HELDOUT_DIR}/biden.jpg",
        "3c17508bb91554c637a2eabddfae790e5bb1caba93130814fc2ac50be9760c4c",
    ),
}
TARGET_SETS: Final = ("dev", "heldout")

# A face region whose mean is below this is black, not dark: our darkest variant (45%) keeps
# faces well above it.
BLACK_MEAN: Final = 10.0
# Mean absolute difference (0-255) over the face below which nothing was swapped. A real swap
# moves it by tens; this tolerates a lossy re-encode of an untouched image.
UNCHANGED_MEAN_ABS_DIFF: Final = 2.0


# -- the photos ---------------------------------------------------------------------------------


def _decode(path: Path) -> Image:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise RuntimeError(f"cannot decode {path}")
    return image


def load_photos() -> dict[str, Image]:
    """astronaut, t1 and hanks as BGR images.

    The insightface images come from the fixture step's copies in the settings' testdata
    directory; missing or altered ones are fetched again from the pinned sdist there.
    """
    testdata = Settings().testdata_dir
    for image in INSIGHTFACE_IMAGES:
        path = testdata / image.filename
        if path.is_file() and sha256_file(path) != image.sha256:
            print(
                f"warning: {path} does not match its pinned sha256; fetching the sdist instead",
                file=sys.stderr,
            )
    paths = {path.name: path for path in fetch_insightface_images(testdata)}
    return {
        "astronaut": cv2.cvtColor(skimage_data.astronaut(), cv2.COLOR_RGB2BGR),
        "t1": _decode(paths["t1.jpg"]),
        "hanks": _decode(paths["Tom_Hanks_54745.png"]),
    }


# -- identities and target variants ---------------------------------------------------------


@dataclass(frozen=True)
class Portrait:
    """One person's image (PORTRAIT_SIZE square, nobody else in it) and the face box in it."""

    name: str
    image: Image
    box: Box


@dataclass(frozen=True)
class Target:
    identity: str
    variant: str
    image: Image
    box: Box  # where the face is, so the swapped face can be found at the same place

    @property
    def file_name(self) -> str:
        return f"{self.identity}__{self.variant}.png"


def _box_width(box: Box) -> float:
    return box[2] - box[0]


def _box_centre(box: Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def portrait(name: str, image: Image, face: Box) -> Portrait:
    """A square crop twice the face's size around it, scaled to PORTRAIT_SIZE.

    Edges are replicated where the crop leaves the photo (Hanks' 112 px aligned face has no
    margin at all); replicated streaks, unlike a mirrored border, contain no second face.
    """
    cx, cy = _box_centre(face)
    side = 2.0 * max(face[2] - face[0], face[3] - face[1])
    pad = int(side)
    padded = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    x0, y0 = round(cx - side / 2) + pad, round(cy - side / 2) + pad
    crop = padded[y0 : y0 + round(side), x0 : x0 + round(side)]
    scale = PORTRAIT_SIZE / crop.shape[0]
    resized = cv2.resize(crop, (PORTRAIT_SIZE, PORTRAIT_SIZE), interpolation=cv2.INTER_CUBIC)
    ox, oy = x0 - pad, y0 - pad
    box = (
        (face[0] - ox) * scale,
        (face[1] - oy) * scale,
        (face[2] - ox) * scale,
        (face[3] - oy) * scale,
    )
    return Portrait(name=name, image=resized, box=box)


def _largest(boxes: Sequence[Box], what: str) -> Box:
    if not boxes:
        raise RuntimeError(f"dlib finds no face in {what}")
    return max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))


def build_identities(recognizer: DlibRecognizer, photos: dict[str, Image]) -> list[Portrait]:
    """astronaut, hanks, and t1_1..t1_6 (the people in t1, left to right)."""
    people = [
        portrait(
            "astronaut",
            photos["astronaut"],
            _largest(recognizer.detect(photos["astronaut"])[0], "astronaut"),
        ),
        portrait(
            "hanks",
            photos["hanks"],
            _largest(recognizer.detect(photos["hanks"])[0], "Tom_Hanks_54745.png"),
        ),
    ]
    t1_faces, _ = recognizer.detect(photos["t1"])
    if len(t1_faces) != T1_PEOPLE:
        raise RuntimeError(f"expected {T1_PEOPLE} faces in t1.jpg, dlib finds {len(t1_faces)}")
    for i, face in enumerate(sorted(t1_faces), start=1):
        people.append(portrait(f"t1_{i}", photos["t1"], face))
    return people


def build_heldout(recognizer: DlibRecognizer) -> list[Portrait]:
    """The held-out people (HELDOUT_IMAGES), each the largest face of their photo."""
    dest = Settings().testdata_dir / "heldout"
    paths = fetch_images(FACE_RECOGNITION, tuple(HELDOUT_IMAGES.values()), dest)
    people = []
    for name, path in zip(HELDOUT_IMAGES, paths, strict=True):
        photo = _decode(path)
        people.append(portrait(name, photo, _largest(recognizer.detect(photo)[0], path.name)))
    return people


def _rotated(p: Portrait, degrees: float) -> tuple[Image, Box]:
    # About the face centre, so the face stays whole and its box keeps its centre.
    centre = _box_centre(p.box)
    matrix = cv2.getRotationMatrix2D(centre, degrees, 1.0)
    size = (p.image.shape[1], p.image.shape[0])
    flags, border = cv2.INTER_CUBIC, cv2.BORDER_REPLICATE
    return cv2.warpAffine(p.image, matrix, size, flags=flags, borderMode=border), p.box


def _darkened(p: Portrait) -> tuple[Image, Box]:
    return np.clip(p.image.astype(np.float32) * DARKEN + 0.5, 0, 255).astype(np.uint8), p.box


def _small(p: Portrait) -> tuple[Image, Box]:
    # The whole portrait scaled down so the face is ~50 px, centred on a canvas of the usual size
    # (a small face in a larger frame); a flat fill, since anything face-like there could be
    # picked as the largest face instead.
    scale = SMALL_FACE_PX / _box_width(p.box)
    small = cv2.resize(p.image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    canvas = np.empty_like(p.image)
    canvas[:] = p.image.reshape(-1, 3).mean(axis=0).round().astype(np.uint8)
    dy, dx = (canvas.shape[0] - small.shape[0]) // 2, (canvas.shape[1] - small.shape[1]) // 2
    canvas[dy : dy + small.shape[0], dx : dx + small.shape[1]] = small
    x1, y1, x2, y2 = p.box
    return canvas, (x1 * scale + dx, y1 * scale + dy, x2 * scale + dx, y2 * scale + dy)


def _lower_covered(p: Portrait, nose: tuple[float, float]) -> tuple[Image, Box]:
    # A mask: from just under the nose to below the chin, a little wider than the face box.
    x1, y1, x2, y2 = p.box
    w, h = x2 - x1, y2 - y1
    top = nose[1] + 0.06 * h
    image = p.image.copy()
    cv2.rectangle(
        image,
        (round(x1 - 0.05 * w), round(top)),
        (round(x2 + 0.05 * w), round(min(image.shape[0] - 1, y2 + 0.2 * h))),
        OCCLUDER_BGR,
        thickness=cv2.FILLED,
    )
    return image, p.box


def _mirrored(p: Portrait) -> tuple[Image, Box]:
    width = p.image.shape[1]
    x1, y1, x2, y2 = p.box
    return cv2.flip(p.image, 1), (width - x2, y1, width - x1, y2)


VARIANTS: Final = (
    "original",
    "rot_ccw20",
    "rot_cw20",
    "dark45",
    "small50",
    "lower_covered",
    "hflip",
)


def make_targets(recognizer: DlibRecognizer, p: Portrait) -> list[Target]:
    nose = recognizer.landmarks(p.image, p.box)[4]
    makers: dict[str, Callable[[], tuple[Image, Box]]] = {
        "original": lambda: (p.image, p.box),
        # OpenCV's positive angle turns the image counter-clockwise.
        "rot_ccw20": lambda: _rotated(p, ROTATION_DEG),
        "rot_cw20": lambda: _rotated(p, -ROTATION_DEG),
        "dark45": lambda: _darkened(p),
        "small50": lambda: _small(p),
        "lower_covered": lambda: _lower_covered(p, (float(nose[0]), float(nose[1]))),
        "hflip": lambda: _mirrored(p),
    }
    return [Target(p.name, variant, *makers[variant]()) for variant in VARIANTS]


# -- running the swap ---------------------------------------------------------------------------


def default_livefuse() -> str | None:
    beside_python = Path(sys.executable).with_name("livefuse")
    return str(beside_python) if beside_python.exists() else shutil.which("livefuse")


def swap_argv(
    *, template: str | None, livefuse: str, faces: str, source: Path, target: Path, output: Path
) -> list[str]:
    if template is None:
        paths = ["--source", str(source), "--target", str(target), "--output", str(output)]
        return [livefuse, "swap", *paths, "--faces", faces]
    values = {"{source}": source, "{target}": target, "{output}": output, "{faces}": faces}

    def fill(token: str) -> str:
        for placeholder, value in values.items():
            token = token.replace(placeholder, str(value))
        return token

    return [fill(token) for token in shlex.split(template)]


@dataclass(frozen=True)
class SwapRun:
    source: str
    argv: list[str]
    returncode: int | None  # None: it did not finish in time
    seconds: float


def run_swap(source: str, argv: list[str], timeout: float) -> SwapRun:
    started = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        print(f"  swap for {source} timed out after {timeout:.0f} s", file=sys.stderr)
        return SwapRun(source, argv, None, time.monotonic() - started)
    except OSError as error:  # not found, not executable
        print(f"  swap for {source} could not start: {error}", file=sys.stderr)
        return SwapRun(source, argv, 127, time.monotonic() - started)
    if done.returncode != 0:
        tail = (
            "\n    ".join((done.stderr or done.stdout).strip().splitlines()[-10:]) or "(no output)"
        )
        print(f"  swap for {source} exited {done.returncode}:\n    {tail}", file=sys.stderr)
    return SwapRun(source, argv, done.returncode, time.monotonic() - started)


# -- scoring ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    source: str
    target: str
    variant: str
    file: str
    baseline: float  # d(target before the swap, source): different people, so normally > 0.6
    d_source: float | None  # d(swapped face, source)
    d_target: float | None  # d(swapped face, target before the swap)
    found: str  # how the swapped face was found (a detector stage, or "box"); "" with no output
    broken: str  # "", "no_output", "unreadable", "black", "unchanged"
    passed: bool


def _clip_box(box: Box, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    height, width = shape[:2]
    x1, y1, x2, y2 = box
    return (
        max(0, int(x1)),
        max(0, int(y1)),
        min(width, int(np.ceil(x2))),
        min(height, int(np.ceil(y2))),
    )


def _scaled_box(box: Box, from_shape: tuple[int, ...], to_shape: tuple[int, ...]) -> Box:
    sx, sy = to_shape[1] / from_shape[1], to_shape[0] / from_shape[0]
    return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy


def broken_reason(before: Image, after: Image, box: Box) -> str:
    """Why an output is broken regardless of identity: a black face, or a face left as it was."""
    x1, y1, x2, y2 = _clip_box(box, after.shape)
    face_after = after[y1:y2, x1:x2].astype(np.float32)
    if face_after.size == 0 or float(face_after.mean()) < BLACK_MEAN:
        return "black"
    if after.shape == before.shape:
        diff = np.abs(face_after - before[y1:y2, x1:x2].astype(np.float32))
        if float(diff.mean()) < UNCHANGED_MEAN_ABS_DIFF:
            return "unchanged"
    return ""


def score(
    recognizer: DlibRecognizer,
    *,
    source: str,
    source_descriptor: Descriptor,
    target: Target,
    target_face: FaceMatch,
    output: Image | None,
    broken_if_missing: str,
) -> Row:
    d_source: float | None = None
    d_target: float | None = None
    found, broken = "", broken_if_missing
    if output is not None:
        # The swapper may have resized: look for the face where it was, scaled with the image.
        box = _scaled_box(target.box, target.image.shape, output.shape)
        broken = broken_reason(target.image, output, box)
        swapped = recognizer.locate(output, box)
        if swapped is not None:
            d_source = recognizer.distance(swapped.descriptor, source_descriptor)
            d_target = recognizer.distance(swapped.descriptor, target_face.descriptor)
            found = swapped.method
    passed = (
        not broken
        and d_source is not None
        and d_target is not None
        and d_source < SAME_PERSON_THRESHOLD
        and d_source < d_target
    )
    return Row(
        source=source,
        target=target.identity,
        variant=target.variant,
        file=target.file_name,
        baseline=recognizer.distance(target_face.descriptor, source_descriptor),
        d_source=d_source,
        d_target=d_target,
        found=found,
        broken=broken,
        passed=passed,
    )


def read_output(path: Path) -> tuple[Image | None, str]:
    if not path.is_file():
        return None, "no_output"
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return (None, "unreadable") if image is None else (image, "")


# -- reporting ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamePerson:
    identity: str
    variant: str
    distance: float  # d(original, variant) for one person
    found: str  # how dlib found the face in the variant


def _fmt(value: float | None) -> str:
    return "  -  " if value is None else f"{value:5.3f}"


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _counts(labels: Iterable[str]) -> str:
    tally: dict[str, int] = {}
    for label in labels:
        if label:
            tally[label] = tally.get(label, 0) + 1
    return " ".join(f"{k}:{v}" for k, v in sorted(tally.items())) or "-"


class _HasVariant(Protocol):
    @property
    def variant(self) -> str: ...


_Item = TypeVar("_Item", bound=_HasVariant)


def _by_variant(items: Sequence[_Item]) -> Iterator[tuple[str, list[_Item]]]:
    for variant in VARIANTS:
        group = [item for item in items if item.variant == variant]
        if group:
            yield variant, group


def _print_table(title: str, header: Sequence[str], lines: Iterable[Sequence[str]]) -> None:
    """Left-aligned first column, right-aligned numbers, a free-form last column."""
    table = [list(header), *(list(line) for line in lines)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    print(f"\n{title}")
    for row in table:
        numbers = [c.rjust(w) for c, w in zip(row[1:-1], widths[1:], strict=True)]
        print("  ".join([row[0].ljust(widths[0]), *numbers, row[-1]]))


def _rate(passed: int, n: int) -> float:
    return passed / n if n else 0.0


def print_same_person(rows: Sequence[SamePerson]) -> dict[str, dict[str, object]]:
    summary: dict[str, dict[str, object]] = {}
    lines = []
    for variant, group in _by_variant(rows):
        d = [r.distance for r in group]
        same = sum(x < SAME_PERSON_THRESHOLD for x in d)
        mean, median = statistics.fmean(d), statistics.median(d)
        summary[variant] = {
            "n": len(d),
            "mean": mean,
            "median": median,
            "max": max(d),
            "same": same,
        }
        found = _counts(r.found for r in group)
        lines.append(
            [
                variant,
                str(len(d)),
                _fmt(mean),
                _fmt(median),
                _fmt(max(d)),
                f"{same}/{len(d)}",
                found,
            ]
        )
    _print_table(
        "Recogniser alone: one person, original vs variant"
        f" (how hard the variant is for dlib; < {SAME_PERSON_THRESHOLD} = same person)",
        ["variant", "n", "mean", "median", "max", "<0.6", "found by"],
        lines,
    )
    return summary


def print_baseline(rows: Sequence[Row]) -> dict[str, dict[str, object]]:
    summary: dict[str, dict[str, object]] = {}
    lines = []
    for variant, group in _by_variant(rows):
        d = [r.baseline for r in group]
        apart = sum(x > SAME_PERSON_THRESHOLD for x in d)
        summary[variant] = {"n": len(d), "mean": statistics.fmean(d), "min": min(d), "apart": apart}
        lines.append(
            [variant, str(len(d)), _fmt(statistics.fmean(d)), _fmt(min(d)), f"{apart}/{len(d)}", ""]
        )
    _print_table(
        "Baseline: target before the swap vs source"
        f" (different people; want > {SAME_PERSON_THRESHOLD})",
        ["variant", "n", "mean", "min", ">0.6", ""],
        lines,
    )
    # A target dlib already takes for the source cannot show that a swap worked.
    for r in rows:
        if r.variant == "original" and r.baseline <= SAME_PERSON_THRESHOLD:
            print(f"  note: dlib takes {r.target} for source {r.source} already ({r.baseline:.3f})")
    return summary


def _swap_line(label: str, group: Sequence[Row]) -> list[str]:
    passed = sum(r.passed for r in group)
    return [
        label,
        str(len(group)),
        str(passed),
        f"{_rate(passed, len(group)):.1%}",
        _fmt(_mean(r.d_source for r in group)),
        _fmt(_mean(r.d_target for r in group)),
        f"{_counts(r.broken for r in group)} / {_counts(r.found for r in group)}",
    ]


def _pass_summary(group: Sequence[Row]) -> dict[str, object]:
    passed = sum(r.passed for r in group)
    return {"n": len(group), "passed": passed, "pass_rate": _rate(passed, len(group))}


def print_swap(rows: Sequence[Row]) -> dict[str, object]:
    by_variant = dict(_by_variant(rows))
    by_source = {
        s: [r for r in rows if r.source == s] for s in dict.fromkeys(r.source for r in rows)
    }
    _print_table(
        "Swap: swapped face vs source (d_src) and vs the target before the swap (d_tgt)",
        ["variant", "n", "pass", "rate", "d_src", "d_tgt", "broken / found by"],
        [
            *(_swap_line(variant, group) for variant, group in by_variant.items()),
            *(_swap_line(f"from {source}", group) for source, group in by_source.items()),
            _swap_line("overall", rows),
        ],
    )
    return {
        "per_variant": {variant: _pass_summary(group) for variant, group in by_variant.items()},
        "per_source": {source: _pass_summary(group) for source, group in by_source.items()},
        "overall": _pass_summary(rows),
    }


THUMB: Final = 80
LABEL_H: Final = 30
GAP: Final = 6


def _thumb(image: Image | None, box: Box) -> Image:
    """The face and some context around it (the whole image would make `small50` unreadable)."""
    if image is None:
        return np.zeros((THUMB, THUMB, 3), np.uint8)
    cx, cy = _box_centre(box)
    half = 0.8 * max(box[2] - box[0], box[3] - box[1])
    pad = int(half) + 1
    padded = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    x0, y0 = round(cx - half) + pad, round(cy - half) + pad
    crop = padded[y0 : y0 + round(2 * half), x0 : x0 + round(2 * half)]
    return cv2.resize(crop, (THUMB, THUMB), interpolation=cv2.INTER_AREA)


def _tile(source: Image, target: Image, output: Image, row: Row) -> Image:
    tile = np.full((THUMB + LABEL_H, 3 * THUMB, 3), 255, np.uint8)
    tile[:THUMB] = np.hstack([source, target, output])
    colour = (0, 140, 0) if row.passed else (0, 0, 200)
    verdict = "PASS" if row.passed else (row.broken.upper() or "FAIL")
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(
        tile,
        f"{row.source} > {row.target} {row.variant}",
        (2, THUMB + 11),
        font,
        0.33,
        (0, 0, 0),
        1,
        cv2.LINE_AA,
    )
    cv2.putText(
        tile,
        f"s {_fmt(row.d_source)} t {_fmt(row.d_target)} {verdict}",
        (2, THUMB + 25),
        font,
        0.36,
        colour,
        1,
        cv2.LINE_AA,
    )
    return tile


def write_sheet(
    path: Path,
    rows: Sequence[Row],
    portraits: dict[str, Portrait],
    targets: dict[tuple[str, str], Target],
    outputs: dict[tuple[str, str, str], Image | None],
) -> None:
    """A grid: one line per (source, target person), one column per variant; each tile shows
    source | target | output with the two distances and the verdict."""
    lines: dict[tuple[str, str], dict[str, Image]] = {}
    for row in rows:
        target = targets[(row.target, row.variant)]
        source = portraits[row.source]
        output = outputs.get((row.source, row.target, row.variant))
        out_box = (
            target.box
            if output is None
            else _scaled_box(target.box, target.image.shape, output.shape)
        )
        lines.setdefault((row.source, row.target), {})[row.variant] = _tile(
            _thumb(source.image, source.box),
            _thumb(target.image, target.box),
            _thumb(output, out_box),
            row,
        )
    tile_h, tile_w = THUMB + LABEL_H, 3 * THUMB
    sheet = np.full(
        (len(lines) * (tile_h + GAP) + GAP, len(VARIANTS) * (tile_w + GAP) + GAP, 3), 230, np.uint8
    )
    for i, tiles in enumerate(lines.values()):
        for j, variant in enumerate(VARIANTS):
            if variant in tiles:
                y, x = GAP + i * (tile_h + GAP), GAP + j * (tile_w + GAP)
                sheet[y : y + tile_h, x : x + tile_w] = tiles[variant]
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), sheet):
        raise RuntimeError(f"cannot write {path}")


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.identity_eval",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="exit status: 0 done; 1 pass rate below --min-pass; 2 cannot run;"
        " 3 a swap run failed (its rows count as no_output; reports are still written)",
    )
    parser.add_argument(
        "--livefuse",
        metavar="PATH",
        help="the livefuse executable (default: beside this Python, else on PATH)",
    )
    parser.add_argument(
        "--command",
        metavar="TEMPLATE",
        help="run this instead of livefuse swap; {source} {target} {output} {faces} are filled in,"
        " e.g. 'cp -r {target} {output}' (a swap that changes nothing: must score 0%%)",
    )
    parser.add_argument("--faces", choices=("all", "largest"), default="largest")
    parser.add_argument(
        "--sources",
        metavar="NAMES",
        default=",".join(DEFAULT_SOURCES),
        help="comma-separated identities to use as sources, or 'all'"
        " (astronaut, hanks, t1_1..t1_6: the people in t1.jpg left to right); default %(default)s",
    )
    parser.add_argument(
        "--targets",
        choices=TARGET_SETS,
        default="dev",
        help="dev: every source onto every other identity of the set above (what the swap was"
        " tuned on); heldout: onto four photos of two people never used anywhere else"
        " (face_recognition 1.3.0's test images); default %(default)s",
    )
    parser.add_argument(
        "--json", metavar="PATH", type=Path, help="write per-image rows and summaries here"
    )
    parser.add_argument(
        "--sheet",
        metavar="PATH",
        type=Path,
        help="write a contact sheet PNG (source | target | output per row) here",
    )
    parser.add_argument(
        "--keep",
        metavar="DIR",
        type=Path,
        help="work in this directory and keep the images (else a temporary one)",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=900.0,
        help="time allowed for each swap run (default %(default)s)",
    )
    parser.add_argument(
        "--min-pass",
        metavar="RATE",
        type=float,
        help="exit 1 if the overall pass rate is below this (0-1)",
    )
    return parser.parse_args(argv)


def _select_sources(spec: str) -> list[str]:
    chosen = (
        list(IDENTITIES) if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    )
    unknown = [s for s in chosen if s not in IDENTITIES]
    if unknown or not chosen:
        raise SystemExit(
            f"unknown --sources {unknown or spec!r}; choose from {', '.join(IDENTITIES)} or 'all'"
        )
    return chosen


def _write_image(path: Path, image: Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise RuntimeError(f"cannot write {path}")


TargetKey = tuple[str, str]  # (identity, variant)


def describe_targets(
    recognizer: DlibRecognizer, targets: Iterable[Target]
) -> dict[TargetKey, FaceMatch]:
    """Each target variant's face before any swap; described once, every source reuses it."""
    faces: dict[TargetKey, FaceMatch] = {}
    for t in targets:
        match = recognizer.locate(t.image, t.box)
        if match is None:
            raise RuntimeError(f"{t.file_name}: face box lies off the image")
        faces[(t.identity, t.variant)] = match
    return faces


def same_person_distances(
    recognizer: DlibRecognizer, faces: dict[TargetKey, FaceMatch]
) -> list[SamePerson]:
    return [
        SamePerson(
            identity=identity,
            variant=variant,
            distance=recognizer.distance(faces[(identity, "original")].descriptor, face.descriptor),
            found=face.method,
        )
        for (identity, variant), face in faces.items()
        if variant != "original"
    ]


@dataclass(frozen=True)
class SourceResult:
    run: SwapRun
    rows: list[Row]
    outputs: dict[tuple[str, str, str], Image | None]  # (source, identity, variant) -> output


def swap_and_score(
    args: argparse.Namespace,
    recognizer: DlibRecognizer,
    *,
    workdir: Path,
    source: Portrait,
    targets: Sequence[Target],
    faces: dict[TargetKey, FaceMatch],
) -> SourceResult:
    """Write one source's targets to a directory, swap them in one run, and score each output."""
    source_path = workdir / "sources" / f"{source.name}.png"
    _write_image(source_path, source.image)
    target_dir, output_dir = workdir / source.name / "targets", workdir / source.name / "output"
    # Both are ours, inside workdir: start clean so that nothing from an earlier --keep run counts.
    shutil.rmtree(target_dir, ignore_errors=True)
    shutil.rmtree(output_dir, ignore_errors=True)
    for t in targets:
        _write_image(target_dir / t.file_name, t.image)

    argv = swap_argv(
        template=args.command,
        livefuse=args.livefuse or "",
        faces=args.faces,
        source=source_path,
        target=target_dir,
        output=output_dir,
    )
    print(f"swap {source.name}: {len(targets)} targets: {shlex.join(argv)}")
    run = run_swap(source.name, argv, args.timeout)
    print(f"  {run.seconds:.1f} s, exit {run.returncode}")

    rows: list[Row] = []
    outputs: dict[tuple[str, str, str], Image | None] = {}
    source_descriptor = faces[(source.name, "original")].descriptor
    for t in targets:
        output, missing = read_output(output_dir / t.file_name)
        outputs[(source.name, t.identity, t.variant)] = output
        rows.append(
            score(
                recognizer,
                source=source.name,
                source_descriptor=source_descriptor,
                target=t,
                target_face=faces[(t.identity, t.variant)],
                output=output,
                broken_if_missing=missing,
            )
        )
    return SourceResult(run=run, rows=rows, outputs=outputs)


def evaluate(args: argparse.Namespace, workdir: Path) -> int:
    sources = _select_sources(args.sources)
    args.livefuse = args.livefuse or default_livefuse()
    if args.command is None and args.livefuse is None:
        print(
            "error: no livefuse executable found; pass --livefuse PATH or --command TEMPLATE",
            file=sys.stderr,
        )
        return 2

    recognizer = DlibRecognizer()
    portraits = {p.name: p for p in build_identities(recognizer, load_photos())}
    targets = [t for p in portraits.values() for t in make_targets(recognizer, p)]
    source_faces = describe_targets(
        recognizer, [t for t in targets if t.variant == "original" and t.identity in sources]
    )
    if args.targets == "heldout":
        heldout = {p.name: p for p in build_heldout(recognizer)}
        portraits.update(heldout)
        targets = [t for p in heldout.values() for t in make_targets(recognizer, p)]
    target_faces = describe_targets(recognizer, targets)
    same_person = same_person_distances(recognizer, target_faces)
    faces = {**source_faces, **target_faces}

    results = [
        swap_and_score(
            args,
            recognizer,
            workdir=workdir,
            source=portraits[name],
            # Every other person is a target; the source's own images would prove nothing.
            targets=[t for t in targets if t.identity != name],
            faces=faces,
        )
        for name in sources
    ]
    rows = [row for r in results for row in r.rows]

    same_summary = print_same_person(same_person)
    baseline_summary = print_baseline(rows)
    swap_summary = print_swap(rows)
    report = {
        "threshold": SAME_PERSON_THRESHOLD,
        "pass_rule": "d_source < threshold and d_source < d_target",
        "sources": sources,
        "targets": args.targets,
        "identities": list(dict.fromkeys(t.identity for t in targets)),
        "variants": list(VARIANTS),
        "runs": [asdict(r.run) for r in results],
        "same_person": {"summary": same_summary, "rows": [asdict(r) for r in same_person]},
        "baseline": baseline_summary,
        "swap": swap_summary,
        "rows": [asdict(r) for r in rows],
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    if args.sheet:
        outputs = {key: image for r in results for key, image in r.outputs.items()}
        write_sheet(
            args.sheet, rows, portraits, {(t.identity, t.variant): t for t in targets}, outputs
        )
        print(f"wrote {args.sheet}")

    failed = [r.run.source for r in results if r.run.returncode != 0]
    if failed:
        print(
            f"swap failed for {', '.join(failed)}: files it did not write count as no_output",
            file=sys.stderr,
        )
        return 3
    rate = _rate(sum(r.passed for r in rows), len(rows))
    if args.min_pass is not None and rate < args.min_pass:
        print(f"pass rate {rate:.1%} is below --min-pass {args.min_pass:.1%}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            return evaluate(args, args.keep.resolve())
        with tempfile.TemporaryDirectory(prefix="livefuse-identity-") as tmp:
            return evaluate(args, Path(tmp))
    except ModelError as error:  # a pinned photo could not be fetched or did not match
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
