#!/usr/bin/env bash
# Set up p2ch (scripts/setup.sh) and run the whole test suite on the CPU.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k geometry -x
set -euo pipefail
case "${1:-}" in
  -h|--help) echo "usage: bash scripts/test.sh [PYTEST_ARGS...]   (sets up .venv, then runs pytest)"; exit 0 ;;
esac
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
venv=${P2CH_VENV:-.venv}
exec "$venv/bin/python" -m pytest "$@"
