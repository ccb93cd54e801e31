#!/usr/bin/env bash
# Instructions per request of two commits, side by side: the base in a
# temporary worktree and the checkout, run one after the other under callgrind
# (bench/inprocess.py --instructions), alternating, RUNS times each.
#   bench/ab_instructions.sh BASE_COMMIT [EVENTS] [RUNS]     e.g. bench/ab_instructions.sh 73f9e26 10 3
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:?a base commit}; events=${2:-10}; runs=${3:-3}
py=${PY:-.venv/bin/python}
py=$(readlink -f "$py")
tree=$(mktemp -d)
trap 'git worktree remove --force "$tree" >/dev/null 2>&1 || rm -rf "$tree"' EXIT
git worktree add --detach "$tree" "$base" >/dev/null
for _ in $(seq "$runs"); do
  (cd "$tree" && PYTHONHASHSEED=0 "$py" bench/inprocess.py --instructions --events "$events" --requests 2000 | tail -1 | sed "s/^/$base: /")
  PYTHONHASHSEED=0 "$py" bench/inprocess.py --instructions --events "$events" --requests 2000 | tail -1 | sed "s/^/head: /"
done
