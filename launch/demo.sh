#!/usr/bin/env bash
# The main job: set up the environment, run the demo scaling sweep on an embedded local Ray
# (2 model sizes x {no regularizer, L1 on the MLP units} x 3 seeds = 12 small trials on the
# synthetic factored language, each trained to convergence, Ray Tune scheduling Ray Train
# trials two at a time), then write the trade-off report (Pareto frontiers, the
# interpretability tax vs parameters with its noise floor). docs/experiments/demo.md reads it.
#   bash launch/demo.sh [OUT] [extra tti sweep arguments, e.g. --set train.steps=200]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup.sh"
cd "$ROOT"
# The venv's tools first: DeepSpeed JIT-builds its CPU comm op with the first `ninja` on
# PATH, and two ninja versions (the venv's and the system's) record different command
# hashes, so processes alternating between them rebuild the op each time.
export PATH="$ROOT/.venv/bin:$PATH"
OUT="${1:-sweeps/demo-$(date +%Y%m%d-%H%M%S)}"
shift || true
# DeepSpeed picks its accelerator at import; without a GPU it must be the CPU one.
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export DS_ACCELERATOR=cpu
fi
.venv/bin/tti sweep configs/sweeps/demo.yaml --out "$OUT" "$@"
.venv/bin/tti report "$OUT"
echo "TensorBoard: .venv/bin/tti tensorboard $OUT"
