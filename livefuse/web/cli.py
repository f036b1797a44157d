"""The `livefuse` command line.

Settings are read here, once, and passed to each command. Commands are imported lazily so
`livefuse models ...` never pays for the pipeline's imports. A `ModelError` anywhere is
reported as its one line on stderr with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from livefuse import __version__
from livefuse.engines.store import ModelError
from livefuse.settings import Settings

EXIT_FAILURE, EXIT_USAGE = 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="livefuse", description="Real-time face swap for live video."
    )
    parser.add_argument("--version", action="version", version=f"livefuse {__version__}")
    parser.set_defaults(print_usage=parser.print_help)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    models = commands.add_parser(
        "models", help="list, pull and verify the models", description="Manage cached models."
    )
    models.set_defaults(print_usage=models.print_help)
    models_commands = models.add_subparsers(dest="models_command", metavar="ACTION")
    models_commands.add_parser("list", help="show every known model and its state")
    pull = models_commands.add_parser(
        "pull", help="download, check and convert models (default: the embedded set)"
    )
    pull.add_argument("names", nargs="*", metavar="NAME")
    verify = models_commands.add_parser(
        "verify", help="check cached models against their records and signatures"
    )
    verify.add_argument("names", nargs="*", metavar="NAME")

    swap = commands.add_parser(
        "swap",
        help="swap faces in an image, a directory of images or a video",
        description=(
            "Replace the faces in TARGET with the face in SOURCE. TARGET may be an image, "
            "a directory of images (OUTPUT is then a directory, same file names) or a "
            "video (audio is kept)."
        ),
    )
    swap.add_argument("--source", type=Path, required=True, metavar="IMG")
    swap.add_argument("--target", type=Path, required=True, metavar="PATH")
    swap.add_argument("--output", type=Path, required=True, metavar="PATH")
    swap.add_argument("--faces", choices=("all", "largest"), default="all")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None or (args.command == "models" and args.models_command is None):
        args.print_usage(sys.stderr)
        return EXIT_USAGE
    try:
        settings = Settings()
    except ValidationError as error:
        problems = "; ".join(
            f"LIVEFUSE_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in error.errors()
        )
        print(f"livefuse: invalid settings: {problems}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "models":
            from livefuse.web import models_command

            return models_command.run(args, settings)
        if args.command == "swap":
            from livefuse.web import swap_command

            return swap_command.run(args, settings)
    except ModelError as error:
        print(error, file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        # Anything unforeseen still ends in one line a person can act on; the traceback
        # is there for whoever asks for it.
        if os.environ.get("LIVEFUSE_DEBUG"):
            raise
        print(
            f"livefuse: unexpected error: {type(error).__name__}: {error} "
            "(set LIVEFUSE_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    parser.error(f"unknown command {args.command!r}")
    return EXIT_USAGE  # not reached: parser.error exits


if __name__ == "__main__":
    sys.exit(main())
