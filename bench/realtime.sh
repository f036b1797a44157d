#!/usr/bin/env bash
# The real-time figures in BENCHMARKS.md: test clips made from the pinned test photos with
# `livefuse clip`, then `livefuse bench` over each, JSON into bench/results/.
# Usage: bench/realtime.sh [MACHINE_NAME]   (run on a quiet machine; takes about 4 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
machine=${1:-cpu-2core}
livefuse=.venv/bin/livefuse
testdata=$(.venv/bin/python -c 'from livefuse.settings import Settings; print(Settings().testdata_dir)')
clips=${LIVEFUSE_CLIPS:-/tmp/livefuse-clips}
source_face=$testdata/Tom_Hanks_54745.png
results=bench/results
mkdir -p "$clips" "$results"

make_clip() {  # name, then livefuse clip arguments
    local name=$1
    shift
    [ -f "$clips/$name.mp4" ] || "$livefuse" clip --output "$clips/$name.mp4" "$@"
}
# Five faces in view (t1.jpg's six people; the pan takes one out of frame), 10 s, moving.
make_clip group5 --photo "$testdata/t1.jpg" --seconds 10
# One face of about 250 px (the astronaut's head and shoulders), 10 s, moving.
make_clip astronaut1 --photo "$testdata/astronaut.png" --crop 0,0,512,288 --seconds 10
# Still cameras with sensor noise: what the landmark jitter is measured on.
make_clip group6-static --photo "$testdata/t1.jpg" --seconds 6 --static
make_clip astronaut1-static --photo "$testdata/astronaut.png" --crop 0,0,512,288 --seconds 6 --static

bench() {  # result name, clip name, then livefuse bench arguments
    local name=$1 clip=$2
    shift 2
    "$livefuse" bench --source "$source_face" --video "$clips/$clip.mp4" \
        --json "$results/realtime-$name-$machine.json" "$@"
}
bench group5-paced-auto group5
bench group5-paced-high group5 --quality high
bench group5-paced-fast group5 --quality fast
bench group5-unpaced-auto group5 --unpaced
bench group5-unpaced-fast group5 --unpaced --quality fast
bench astronaut1-paced-auto astronaut1
bench astronaut1-unpaced-auto astronaut1 --unpaced
bench astronaut1-unpaced-high astronaut1 --unpaced --quality high
bench group6-static-paced-auto group6-static
bench astronaut1-static-paced-auto astronaut1-static
