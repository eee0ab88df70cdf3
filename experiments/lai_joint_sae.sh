#!/usr/bin/env bash
# Lai et al. 2025 joint SAE training on Shakespeare, reproduced at CPU scale
# (docs/experiments/lai_joint_sae.md). Trains 3 seeds x {baseline, regularized} in two lanes
# (one thread each), then fits fresh TopK SAEs (512 latents, k = 18 at each of the 5 sites:
# summed L0 90) on every final checkpoint and measures them spliced in one at a time and all
# at once, then prints the comparison table.
#   bash experiments/lai_joint_sae.sh [OUT] [STEPS]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-runs/lai_joint_sae}"
STEPS="${2:-500}"
cd "$ROOT"
export PATH="$ROOT/.venv/bin:$PATH" OMP_NUM_THREADS=1
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || export DS_ACCELERATOR=cpu
CFG=configs/experiments/lai_joint_sae.yaml
EVERY=$((STEPS / 4))
COMMON=(--set train.steps="$STEPS" --set optim.warmup_steps=$((STEPS / 20)) --set train.eval_every=$EVERY
        --set train.eval_batches=8 --set checkpoint.every=$((STEPS / 2)))
SITES=(--site blocks.0.resid_pre --site blocks.0.resid_post --site blocks.1.resid_post
       --site blocks.2.resid_post --site blocks.3.resid_post)
mkdir -p "$OUT"
regularized() {
  for s in 1 2 3; do
    tti train $CFG --run-dir "$OUT/reg_s$s" "${COMMON[@]}" --set train.seed=$s > "$OUT/reg_s$s.log" 2>&1
  done
}
baseline() {
  for s in 1 2 3; do
    tti train $CFG --run-dir "$OUT/base_s$s" "${COMMON[@]}" --set train.seed=$s --set 'regularizers=[]' \
      > "$OUT/base_s$s.log" 2>&1
  done
}
regularized & baseline & wait
fit() {
  for run in "$@"; do
    tti sae fit "$OUT/$run" "${SITES[@]}" --latents 512 --k 18 --steps 300 > "$OUT/$run.fit.log" 2>&1
  done
}
fit reg_s1 reg_s2 reg_s3 & fit base_s1 base_s2 base_s3 & wait
python experiments/lai_summary.py "$OUT"
