#!/usr/bin/env bash
# Set up p2ch in a virtual environment (.venv at the repository root, or $P2CH_VENV).
#
# Idempotent: reuses an existing environment and only installs what is missing.
# Torch: on a machine without an NVIDIA GPU the small CPU build is preferred (a local
# wheelhouse first, then PyTorch's CPU index), since the default PyPI build drags in
# several GB of CUDA libraries that such a machine cannot use. Set P2CH_TORCH to pin
# another requirement (e.g. P2CH_TORCH='torch==2.5.1').
set -euo pipefail

usage() { echo "usage: bash scripts/setup.sh   (env: PYTHON=python3, P2CH_VENV=.venv, P2CH_TORCH='torch>=2.2')"; }
case "${1:-}" in -h|--help) usage; exit 0 ;; "") ;; *) usage >&2; exit 2 ;; esac

cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python3}
venv=${P2CH_VENV:-.venv}
torch_req=${P2CH_TORCH:-torch>=2.2}

if ! command -v "$python" >/dev/null 2>&1; then
  echo "setup: '$python' not found; install Python 3.10 or newer, or set PYTHON=/path/to/python3" >&2
  exit 1
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "setup: $("$python" --version 2>&1) is too old; p2ch needs Python 3.10 or newer (set PYTHON=...)" >&2
  exit 1
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating virtual environment $venv"
  "$python" -m venv "$venv" || {
    echo "setup: '$python -m venv' failed; on Debian/Ubuntu install python3-venv" >&2
    exit 1
  }
fi
py="$venv/bin/python"
pip=("$py" -m pip --disable-pip-version-check)

has_nvidia_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

if ! "$py" -c 'import torch' >/dev/null 2>&1; then
  if [ -n "${P2CH_TORCH:-}" ] || has_nvidia_gpu; then
    echo "setup: installing $torch_req"
    "${pip[@]}" install -q "$torch_req"
  else
    echo "setup: no NVIDIA GPU found; installing a CPU build of torch"
    # 1) A wheel already on this machine (pip's find-links), without touching the network.
    if "${pip[@]}" install -q --no-index --no-deps "$torch_req" >/dev/null 2>&1; then
      version=$("$py" -c 'import importlib.metadata as m; print(m.version("torch"))')
      "${pip[@]}" install -q "torch==$version"   # its dependencies
    # 2) PyTorch's CPU-only index (about 200 MB instead of several GB).
    elif "${pip[@]}" install -q --timeout 20 --retries 1 \
        --index-url https://download.pytorch.org/whl/cpu "$torch_req" 2>/dev/null; then
      :
    # 3) Whatever the default index serves.
    else
      "${pip[@]}" install -q "$torch_req"
    fi
  fi
fi

echo "setup: installing p2ch and its dependencies"
"${pip[@]}" install -q -e '.[dev]'
"$py" -c 'import torch, SimpleITK, diskcache, pandas; print(f"setup: ok (torch {torch.__version__}, CUDA available: {torch.cuda.is_available()})")'
