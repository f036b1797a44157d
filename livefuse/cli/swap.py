"""`livefuse swap`: one source face onto an image, a directory of images, or a video.

`--swapper inswapper`, `--detector scrfd`, `--enhancer gfpgan|codeformer` and
`--occlusion` use bring-your-own models (`livefuse models pull NAME --url URL`); one that
is not registered is reported in one line saying how to register it.

Every problem with an input is reported in one line and nothing already done is lost:
in a directory, an unreadable file is skipped and named, an image with no face is
written through unchanged and named, and the rest are swapped.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from livefuse.engines.backend import Backend, BackendUnavailable, select_backend
from livefuse.engines.images import IMAGE_SUFFIXES, ImageError, read_image
from livefuse.engines.pipeline import FacePipeline, FaceSelection, NoFaceError
from livefuse.engines.store import ModelStore
from livefuse.engines.swapper import SourceFace
from livefuse.settings import Settings
from livefuse.stream.engine import FrameEngine
from livefuse.stream.video_file import VideoError, swap_video

EXIT_OK, EXIT_SOME_FAILED, EXIT_BAD_INPUT = 0, 1, 2


@dataclass
class ImageBatchReport:
    swapped: list[str] = field(default_factory=list)
    faces_swapped: int = 0
    no_face: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def _say(message: str) -> None:
    print(f"livefuse swap: {message}", file=sys.stderr)


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        backend = select_backend(args.backend, threads=settings.threads)
    except BackendUnavailable as error:
        _say(str(error))
        return EXIT_BAD_INPUT
    limits = {"max_bytes": settings.max_image_bytes, "max_pixels": settings.max_image_pixels}
    source_path: Path = args.source
    target: Path = args.target
    output: Path = args.output
    faces: FaceSelection = args.faces

    if not target.exists():
        _say(f"target {target} does not exist")
        return EXIT_BAD_INPUT
    if output.exists() and output.resolve() == target.resolve():
        _say(f"--output is the target itself ({target}); write the result somewhere else")
        return EXIT_BAD_INPUT
    try:
        source_image = read_image(source_path, **limits)
    except ImageError as error:
        _say(f"source: {error}")
        return EXIT_BAD_INPUT

    pipeline = FacePipeline.from_store(
        ModelStore(settings.models_dir),
        threads=settings.threads,
        swapper=getattr(args, "swapper", "mesh"),
        detector=getattr(args, "detector", "centerface"),
        enhancer=getattr(args, "enhancer", "none"),
        occlusion=getattr(args, "occlusion", False),
    )
    try:
        prepared = pipeline.prepare_source(source_image)
    except NoFaceError:
        _say(f"source: no face found in {source_path}; use a photo with a clear, visible face")
        return EXIT_BAD_INPUT
    if prepared.faces_in_image > 1:
        _say(f"source has {prepared.faces_in_image} faces; using the largest")

    if target.is_dir():
        try:
            output.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            _say(f"cannot make the output directory {output}: {error.strerror or error}")
            return EXIT_BAD_INPUT
        report = _swap_directory(pipeline, prepared.face, target, output, faces, limits)
        _print_batch_report(report, output)
        return EXIT_SOME_FAILED if report.failed else EXIT_OK
    if target.suffix.lower() in IMAGE_SUFFIXES:
        report = ImageBatchReport()
        _swap_image_file(pipeline, prepared.face, target, output, faces, limits, report)
        _print_batch_report(report, output)
        return EXIT_BAD_INPUT if report.failed else EXIT_OK
    return _swap_video_file(
        pipeline, prepared.face, target, output, faces, backend, settings.resolved_swap_processes
    )


def _swap_directory(
    pipeline: FacePipeline,
    source: SourceFace,
    target_dir: Path,
    output_dir: Path,
    faces: FaceSelection,
    limits: dict[str, int],
) -> ImageBatchReport:
    report = ImageBatchReport()
    files = sorted(p for p in target_dir.iterdir() if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    for skipped in sorted(set(files) - set(images)):
        report.failed[skipped.name] = f"{skipped}: not an image file name (.jpg, .png, .webp, .bmp)"
    for path in tqdm(images, desc="swapping", unit="image", disable=None):
        try:
            _swap_image_file(pipeline, source, path, output_dir / path.name, faces, limits, report)
        except Exception as error:  # noqa: BLE001 - one image's failure must not stop the rest
            report.failed[path.name] = f"{path}: failed ({type(error).__name__}: {error})"
    return report


def _swap_image_file(
    pipeline: FacePipeline,
    source: SourceFace,
    path: Path,
    output_path: Path,
    faces: FaceSelection,
    limits: dict[str, int],
    report: ImageBatchReport,
) -> None:
    try:
        image = read_image(path, **limits)
    except ImageError as error:
        report.failed[path.name] = str(error)
        return
    meshes = pipeline.find_faces(image)
    if meshes:
        result = pipeline.swap_faces(image, source, meshes, faces=faces)
        report.swapped.append(path.name)
        report.faces_swapped += 1 if faces == "largest" else len(meshes)
    else:
        result = image
        report.no_face.append(path.name)
    if not _write_image(output_path, result):
        report.failed[path.name] = f"cannot write {output_path} (unknown extension or no space)"


def _write_image(path: Path, image: np.ndarray) -> bool:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return bool(cv2.imwrite(str(path), image))
    except (cv2.error, OSError):
        return False


def _print_batch_report(report: ImageBatchReport, output: Path) -> None:
    print(f"swapped {report.faces_swapped} face(s) in {len(report.swapped)} image(s) -> {output}")
    if report.no_face:
        names = ", ".join(report.no_face)
        print(f"no face found, written unchanged: {names}")
    for reason in report.failed.values():
        _say(f"skipped {reason}")


def _swap_video_file(
    pipeline: FacePipeline,
    source: SourceFace,
    target: Path,
    output: Path,
    faces: FaceSelection,
    backend: Backend,
    swap_processes: int,
) -> int:
    bar = tqdm(desc="swapping", unit="frame", disable=None)
    started = time.perf_counter()

    def tick(done: int, total: int | None) -> None:
        if total and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    try:
        engine = FrameEngine(faces=pipeline, swap_processes=swap_processes)
        try:
            report = swap_video(engine, source, target, output, faces=faces, on_frame=tick)
        finally:
            engine.close()
    except VideoError as error:
        bar.close()
        _say(str(error))
        return EXIT_BAD_INPUT
    bar.close()
    elapsed = time.perf_counter() - started
    print(
        f"swapped {report.faces_swapped} face(s) over {report.frames} frame(s) "
        f"({report.frames / max(elapsed, 1e-9):.1f} fps on {backend.name}), audio {report.audio} "
        f"-> {output}"
    )
    if report.frames_with_faces < report.frames:
        print(f"{report.frames - report.frames_with_faces} frame(s) had no face, written unchanged")
    if report.failed_frames:
        _say(f"{report.failed_frames} frame(s) failed and were written unswapped: {report.errors}")
        return EXIT_SOME_FAILED
    return EXIT_OK
