"""Step-time cost of SAE co-training (`type: sae`): co-trained / plain.

The issue's shape: a TopK SAE with 16 x d latents and k = 32 on the last block's residual
stream, trained next to the model with its own Adam (docs/sae.md). Two variants against the
plain model: `sae_detached` (the SAE trains on the detached activation; the model's step is
unchanged) and `sae_joint` (the model also gets the SAE's gradient). Everything else
(round-robin timing, the trainer's step including `after_optimizer_step`, the JSON line) is
bench/regularizer_overhead.py, which this script runs with those variants.

Examples:
    python bench/sae_overhead.py --preset smoke --steps 20                  # CPU
    python bench/sae_overhead.py --preset gpt2-124m --steps 30              # one H100 (bf16)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from regularizer_overhead import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(default_variants=("sae_detached", "sae_joint"), bench_name="sae_overhead"))
