"""`livefuse clip`: a moving 720p test clip from one still photo (see stream.clip)."""

from __future__ import annotations

import argparse
import sys

from livefuse.engines.images import ImageError, read_image
from livefuse.settings import Settings
from livefuse.stream.clip import write_clip

EXIT_OK, EXIT_BAD_INPUT = 0, 2


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        photo = read_image(
            args.photo, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels
        )
    except ImageError as error:
        print(f"livefuse clip: photo: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.crop:
        try:
            x, y, w, h = (int(part) for part in args.crop.split(","))
        except ValueError:
            print(f"livefuse clip: --crop must be X,Y,W,H, not {args.crop!r}", file=sys.stderr)
            return EXIT_BAD_INPUT
        photo = photo[max(0, y) : y + h, max(0, x) : x + w]
        if photo.size == 0:
            print(f"livefuse clip: --crop {args.crop} leaves nothing of the photo", file=sys.stderr)
            return EXIT_BAD_INPUT
    try:
        width, height = (int(part) for part in args.size.lower().split("x"))
    except ValueError:
        print(f"livefuse clip: --size must be WIDTHxHEIGHT, not {args.size!r}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if width % 2 or height % 2 or width <= 0 or height <= 0:
        print(
            f"livefuse clip: --size needs even, positive sides (4:2:0), not {args.size}",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    try:
        write_clip(
            photo,
            args.output,
            seconds=args.seconds,
            fps=args.fps,
            size=(width, height),
            seed=args.seed,
            noise=args.noise,
            static=args.static,
        )
    except ValueError as error:
        print(f"livefuse clip: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"livefuse clip: wrote {args.output}", file=sys.stderr)
    return EXIT_OK
