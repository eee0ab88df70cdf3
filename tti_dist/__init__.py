"""tti_dist: distributed training-time interpretability.

Interpretable-by-construction transformer LMs on megatron-core tensor parallelism and
DeepSpeed ZeRO, orchestrated by Ray, measured in TensorBoard.
"""

import warnings

# megatron-core warns at import, once per process and so once per rank, that Transformer
# Engine and Apex are absent. Neither is on our code path (we use its tensor_parallel
# layers only), so the notice is noise in every multi-rank log.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

__version__ = "0.1.0"
