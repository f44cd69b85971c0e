#!/usr/bin/env bash
# Fill the chunk cache before training: a thin wrapper around `python -m p2ch.prepcache`.
# All options pass through; see `python -m p2ch.prepcache --help` for the full list.
#   scripts/prefill_cache.sh --dry-run                 # how many GB, how much is cached, free space
#   scripts/prefill_cache.sh --num-workers 8           # fill it (rerun to resume after Ctrl-C)
#   scripts/prefill_cache.sh --subsets 0 1 2           # only some subset folders
set -euo pipefail

usage() {
  echo "usage: $0 [--num-workers N] [--data-root DIR] [--cache-dir DIR] [--subsets K ...]"
  echo "       [--width-irc I R C] [--dry-run] [--force] [--clear] [--prune] [--log-level LEVEL]"
  echo "  runs python -m p2ch.prepcache with these options (its --help lists them all)"
}
case "${1:-}" in -h|--help) usage; exit 0 ;; esac

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=python3
if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m p2ch.prepcache "$@"
