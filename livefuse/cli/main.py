"""The `livefuse` command line.

Settings are read here, once, and passed to each command. Commands are imported lazily so
`livefuse models ...` never pays for the pipeline's imports. A `ModelError` anywhere is
reported as its one line on stderr with exit status 2, never a traceback. `serve`, `swap`
and `bench` take `--backend auto|cpu|cuda` and each picks its backend once, at start
(`livefuse.engines.backend.select_backend`); one that cannot run here is one line, status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from livefuse import __version__
from livefuse.cli import models
from livefuse.engines.backend import BACKEND_CHOICES
from livefuse.engines.store import ModelError
from livefuse.settings import Settings

EXIT_FAILURE, EXIT_USAGE = 1, 2


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _add_backend(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default="auto",
        help="where the models run: auto (the best this machine has), cpu or cuda",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="livefuse", description="Real-time face swap for live video."
    )
    parser.add_argument("--version", action="version", version=f"livefuse {__version__}")
    parser.set_defaults(print_usage=parser.print_help)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    models_parser = commands.add_parser(
        "models", help="list, pull and verify the models", description="Manage cached models."
    )
    models.add_arguments(models_parser)

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
    swap.add_argument(
        "--swapper",
        choices=("mesh", "inswapper"),
        default="mesh",
        help="mesh (embedded) or inswapper (bring your own: inswapper_128 and w600k_r50)",
    )
    swap.add_argument(
        "--detector",
        choices=("centerface", "scrfd"),
        default="centerface",
        help="centerface (embedded) or scrfd (bring your own: det_10g or smaller)",
    )
    swap.add_argument(
        "--enhancer",
        choices=("none", "gfpgan", "codeformer"),
        default="none",
        help="restore the swapped face (bring your own: gfpgan_1.4 or codeformer)",
    )
    swap.add_argument(
        "--occlusion",
        action="store_true",
        help="keep hands, glasses and hair over the face (bring your own: face_parser)",
    )
    _add_backend(swap)

    bench = commands.add_parser(
        "bench",
        help="time the real-time pipeline over a clip",
        description=(
            "Run the real-time pipeline over VIDEO with the face in SOURCE, paced at the "
            "clip's frame rate like a camera (or --unpaced, for throughput); print a table "
            "and optionally write the figures as JSON."
        ),
    )
    bench.add_argument("--source", type=Path, required=True, metavar="IMG")
    bench.add_argument("--video", type=Path, required=True, metavar="FILE")
    bench.add_argument("--json", type=Path, metavar="OUT")
    bench.add_argument("--quality", choices=("auto", "high", "balanced", "fast"), default="auto")
    bench.add_argument("--faces", choices=("all", "largest"), default="all")
    bench.add_argument(
        "--unpaced", action="store_true", help="hand in frames as fast as they are taken"
    )
    bench.add_argument(
        "--streams",
        type=_positive_int,
        default=1,
        metavar="N",
        help="run the clip as N concurrent streams (default 1)",
    )
    _add_backend(bench)

    clip = commands.add_parser(
        "clip",
        help="make a moving test clip from a still photo",
        description=(
            "Animate PHOTO (pan, zoom, roll, light drift, sensor noise) into a clip for "
            "benches and tests: .mp4 (H.264) or .y4m (raw, for Chromium's fake camera)."
        ),
    )
    clip.add_argument("--photo", type=Path, required=True, metavar="IMG")
    clip.add_argument("--output", type=Path, required=True, metavar="FILE.mp4|FILE.y4m")
    clip.add_argument("--seconds", type=float, default=10.0)
    clip.add_argument("--fps", type=int, default=30)
    clip.add_argument("--size", default="1280x720", metavar="WxH")
    clip.add_argument("--noise", type=float, default=2.0, help="sensor noise sigma, in levels")
    clip.add_argument("--seed", type=int, default=0)
    clip.add_argument("--static", action="store_true", help="no motion: only the noise")
    clip.add_argument("--crop", metavar="X,Y,W,H", help="use only this part of the photo")

    relay = commands.add_parser(
        "relay",
        help="pull a feed, swap its faces, push it on (RTMP/RTSP/HLS in, RTMP out)",
        description=(
            "Pull --input (rtmp://, rtmps://, rtsp://, http(s):// HLS or a file), swap the "
            "faces with --source and push video and audio to --output (rtmp:// or rtmps://). "
            "Live inputs and the output reconnect by themselves; a file input ends the relay."
        ),
    )
    relay.add_argument("--input", required=True, metavar="URL", help="the feed to pull")
    relay.add_argument("--source", required=True, type=Path, metavar="IMG", help="face to wear")
    relay.add_argument("--output", required=True, metavar="URL", help="rtmp(s) ingest to push to")
    relay.add_argument("--quality", default="auto", choices=("auto", "high", "balanced", "fast"))
    relay.add_argument("--faces", default="all", choices=("all", "largest"))
    relay.add_argument("--bitrate", type=_positive_int, default=None, metavar="KBPS")
    relay.add_argument(
        "--seconds", type=float, default=None, help="stop after this long (default: until ended)"
    )
    relay.add_argument(
        "--label", action="store_true", help="burn an 'AI-generated' label into the video"
    )
    _add_backend(relay)

    serve = commands.add_parser(
        "serve",
        help="run the WebRTC service (WHIP/WHEP, the pages, the API)",
        description=(
            "Serve the publisher page at /, viewers at /watch/SESSION, WHIP ingest at /whip "
            "and WHEP at /whep/SESSION. Listens on loopback unless given a token or --insecure."
        ),
    )
    serve.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 8080)")
    _add_backend(serve)
    serve.add_argument("--max-sessions", type=int, default=None, metavar="N")
    serve.add_argument(
        "--token", default=None, metavar="T", help="the admin Bearer token (allowed everywhere)"
    )
    serve.add_argument(
        "--publish-token",
        action="append",
        default=None,
        metavar="T",
        help="a token for publishers (WHIP, sources, sessions); repeatable",
    )
    serve.add_argument(
        "--view-token",
        action="append",
        default=None,
        metavar="T",
        help="a token for viewers (WHEP and the watch page only); repeatable",
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="also serve /metrics without a token on --metrics-host:PORT (for Prometheus)",
    )
    serve.add_argument(
        "--metrics-host",
        default=None,
        metavar="HOST",
        help="address of the /metrics listener (default 127.0.0.1)",
    )
    serve.add_argument(
        "--peers",
        default=None,
        metavar="URLS",
        help="other nodes: base URLs (comma-separated) or dns:NAME[:PORT]; a full node "
        "redirects new publishers to the peer with most room",
    )
    serve.add_argument(
        "--relay-whip",
        default=None,
        metavar="URL",
        help="re-publish every stream to a media server over WHIP ({name} in URL: the "
        "stream's name)",
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="allow listening beyond loopback without a token",
    )
    serve.add_argument(
        "--label",
        action="store_true",
        default=None,
        help="burn an 'AI-generated' label into every session's video unless it asks "
        "otherwise (?label=0, PATCH label)",
    )
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
            return models.run(args, settings)
        if args.command == "swap":
            from livefuse.cli import swap

            return swap.run(args, settings)
        if args.command == "bench":
            from livefuse.cli import bench

            return bench.run(args, settings)
        if args.command == "clip":
            from livefuse.cli import clip

            return clip.run(args, settings)
        if args.command == "relay":
            from livefuse.cli import relay as relay_command

            return relay_command.run(args, settings)
        if args.command == "serve":
            from livefuse.cli import serve

            return serve.run(args, settings)
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
