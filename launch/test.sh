#!/usr/bin/env bash
# Run the test suite (everything that needs no GPU) in the project's environment.
#   bash launch/test.sh                 # whole suite
#   bash launch/test.sh tests/unit -x   # extra arguments go to pytest
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup.sh"
cd "$ROOT"
# The venv's tools first: DeepSpeed JIT-builds its CPU comm op with the first `ninja` on
# PATH, and two ninja versions (the venv's and the system's) record different command
# hashes, so processes alternating between them rebuild the op each time.
export PATH="$ROOT/.venv/bin:$PATH"
# DeepSpeed picks its accelerator at import; without a GPU it must be the CPU one.
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export DS_ACCELERATOR=cpu
fi
exec .venv/bin/python -m pytest -m "not gpu" -p no:cacheprovider "$@"
