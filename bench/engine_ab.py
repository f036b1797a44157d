"""Old and new code alternated in one run: `livefuse bench` over the same clip, each
configuration run by both in turn, round after round (these machines' timings wander,
so only figures taken side by side are compared).

    .venv/bin/python bench/engine_ab.py --old /tmp/livefuse-before \\
        --source ~/.cache/livefuse/testdata/Tom_Hanks_54745.png --clip /tmp/astronaut1.mp4 \\
        --run "4-unpaced:--streams 4 --unpaced" --run "5-paced:--streams 5" \\
        --rounds 3 --json bench/results/engine_ab-cpu-2core.json

`--old DIR` is a checkout of the code before (`git worktree add DIR COMMIT`), run with
this venv's Python and DIR first on the path; `--old-module` names its CLI module
(`livefuse.web.cli` before the CLI moved to `livefuse.cli.main`). Each run's JSON is
kept whole; the summary gives, per configuration and code, the median and range of the
aggregate frames/s, frames dropped, p95 latency and the slowest stream's frames/s.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_bench(code: str, args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    """One `livefuse bench` run of `code` ("old" or "new"); its JSON."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "bench.json"
        env = dict(os.environ)
        if code == "old":
            env["PYTHONPATH"] = str(args.old)
            module = args.old_module
            cwd = args.old
        else:
            env.pop("PYTHONPATH", None)
            module = "livefuse.cli.main"
            cwd = ROOT
        command = [
            sys.executable, "-m", module, "bench", "--source", str(args.source),
            "--video", str(args.clip), "--json", str(out), *extra,
        ]  # fmt: skip
        started = time.time()
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not out.is_file():
            raise SystemExit(
                f"{code}: {shlex.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}"
            )
        result: dict[str, Any] = json.loads(out.read_text())
        result["ab"] = {"code": code, "started": started, "seconds": time.time() - started}
        return result


def figures(result: dict[str, Any]) -> dict[str, float]:
    per_stream = result.get("per_stream") or [
        {"fps": result["fps"], "dropped_frames": result["dropped_frames"]}
    ]
    frames = result["video"]["frames"] * len(per_stream)
    return {
        "aggregate_fps": float(result.get("aggregate_fps", result["fps"])),
        "dropped_share": result["dropped_frames"] / frames,
        "p95_ms": float(result["latency_ms"]["p95"]),
        "slowest_stream_fps": min(float(s["fps"]) for s in per_stream),
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    table: dict[str, dict[str, dict[str, float]]] = {}
    by_key: dict[tuple[str, str], list[dict[str, float]]] = {}
    for run in runs:
        by_key.setdefault((run["ab"]["name"], run["ab"]["code"]), []).append(figures(run))
    for (name, code), values in by_key.items():
        table.setdefault(name, {})[code] = {
            f"{key}_{stat}": round(fn([v[key] for v in values]), 4)
            for key in values[0]
            for stat, fn in (("median", statistics.median), ("min", min), ("max", max))
        }
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="checkout of the code before")
    parser.add_argument("--old-module", default="livefuse.web.cli")
    parser.add_argument("--source", type=Path, required=True)
    parser.add_argument("--clip", type=Path, required=True)
    parser.add_argument(
        "--run", action="append", required=True, metavar="NAME:BENCH ARGS",
        help="a configuration: a name, a colon, then livefuse bench's arguments",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    runs = []
    for round_index in range(args.rounds):
        for spec in args.run:
            name, _, extra = spec.partition(":")
            # Alternate which code goes first, so neither always meets the warmer machine.
            order = ("old", "new") if round_index % 2 == 0 else ("new", "old")
            for code in order:
                result = run_bench(code, args, shlex.split(extra))
                result["ab"].update(name=name, round=round_index)
                runs.append(result)
                line = figures(result)
                print(
                    f"round {round_index} {name:>12} {code}: {line['aggregate_fps']:6.1f} fps, "
                    f"dropped {100 * line['dropped_share']:5.1f}%, p95 {line['p95_ms']:6.1f} ms, "
                    f"slowest stream {line['slowest_stream_fps']:5.1f} fps",
                    flush=True,
                )
    result = {
        "machine": runs[0]["device"] if runs else "",
        "command": shlex.join([sys.executable, *sys.argv]),
        "summary": summary(runs),
        "runs": runs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
