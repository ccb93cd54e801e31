#!/usr/bin/env bash
# Instructions per request of two commits, side by side: each in a temporary
# worktree, measured by one copy of this checkout's bench/inprocess.py
# --instructions (BENCH_PROXY_TREE names the proxy it imports), under
# callgrind, one after the other, alternating, RUNS times each.
#   bench/ab_instructions.sh BASE [EVENTS] [RUNS] [HEAD]   e.g. bench/ab_instructions.sh 73f9e26 10 3 HEAD
# HEAD defaults to the commit checked out now (uncommitted edits are not measured).
# REQUESTS (default 2000) per callgrind run: fewer is quicker and noisier. ABLATE: a part
# taken away in both (bench/ablate.py), e.g. no-spool: the pipeline alone, without
# the sender whose batches depend on timing (under valgrind, on how slow it runs).
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:?a base commit}; events=${2:-10}; runs=${3:-3}; head=${4:-HEAD}
py=${PY:-.venv/bin/python}
py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")"  # absolute, the venv kept (no symlink resolved)
scratch=$(mktemp -d)
cleanup() {
  git worktree remove --force "$scratch/base" >/dev/null 2>&1 || true
  git worktree remove --force "$scratch/head" >/dev/null 2>&1 || true
  rm -rf "$scratch"
}
trap cleanup EXIT
git worktree add --detach "$scratch/base" "$base" >/dev/null
git worktree add --detach "$scratch/head" "$head" >/dev/null
mkdir "$scratch/script" && cp -r bench "$scratch/script/bench"  # edits made meanwhile do not enter
label_base=$(git rev-parse --short "$base"); label_head=$(git rev-parse --short "$head")
for _ in $(seq "$runs"); do
  for side in base head; do
    label=$([ "$side" = base ] && echo "$label_base" || echo "$label_head")
    BENCH_PROXY_TREE="$scratch/$side" PYTHONHASHSEED=0 "$py" "$scratch/script/bench/inprocess.py" \
      --instructions --events "$events" --requests "${REQUESTS:-2000}" ${ABLATE:+--ablate "$ABLATE"} | tail -1 | sed "s/^/$label: /"
  done
done
