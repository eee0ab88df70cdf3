#!/usr/bin/env bash
# The main job: set up the environment, then train the smoke config (a ~1M-parameter GPT,
# TP=2 x ZeRO-1 on 2 local ranks, 50 steps on the interpreter's standard-library sources).
#   bash launch/demo.sh [extra tti train arguments, e.g. --set train.steps=100]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup.sh"
cd "$ROOT"
exec .venv/bin/tti train configs/smoke.yaml "$@"
