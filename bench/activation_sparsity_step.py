"""Cost of AbsTopK activation sparsity per forward+backward, beside the dense model and a
plain-PyTorch AbsTopK, on one process (TP=1).

Per configuration (width d, layers, batch x seq tokens; abs_topk_fraction 0.25):
  dense   the GPT without activation sparsity.
  torch   the same model with the four default sites (attn_in, attn_out, mlp_in, mlp_out)
          sparsified by the reference code's AbsTopK (openai/circuit_sparsity: torch.topk of
          |x| per token, a gather and a scatter into zeros; ties unspecified).
  tti     tti_dist's AbsTopK (models/activation_sparsity.py) at the same sites: the
          tie-defined topk_mask (lower index first) times x.
  tti all every site (also q, k, v, resid_mid, resid_post).
Times are medians of R repeats of forward + loss + backward after one warm-up, in ms.

    python bench/activation_sparsity_step.py [R] [DEVICE]     # default R = 5, DEVICE = cpu

Asserts nothing: record the printed lines in docs/performance.md.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from tti_dist.config.schema import ABS_TOPK_SITES, ModelConfig
from tti_dist.distributed.groups import init_parallel, shutdown_parallel, single_process_env
from tti_dist.models.activation_sparsity import AbsTopK
from tti_dist.models.gpt import GPT, lm_loss
from tti_dist.utils.seeding import seed_weights

R = int(sys.argv[1]) if len(sys.argv) > 1 else 5
DEVICE = torch.device(sys.argv[2] if len(sys.argv) > 2 else "cpu")
SHAPES = [(128, 2, 16, 128), (256, 4, 8, 256), (512, 4, 4, 256)]  # d, layers, batch, seq


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def reference_abs_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """circuit_sparsity's keep_abstopk: zeros with the k largest-|x| entries per row scattered in."""
    idx = torch.topk(x.abs(), k, dim=-1, sorted=False).indices
    return torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))


def step_ms(model: GPT, tokens: torch.Tensor) -> float:
    def once():
        model.zero_grad(set_to_none=True)
        lm_loss(model(tokens[:, :-1]), tokens[:, 1:]).mean().backward()
        sync()

    once()
    times = []
    for _ in range(R):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def build(groups, d: int, layers: int, **kwargs) -> GPT:
    seed_weights(0)
    cfg = ModelConfig(num_layers=layers, hidden_size=d, num_heads=d // 64 or 2, max_seq_len=256, **kwargs)
    return GPT(cfg, groups).to(DEVICE)


def main() -> None:
    with single_process_env():
        groups = init_parallel(1, DEVICE, 60)
        try:
            print(f"device {DEVICE}, torch threads {torch.get_num_threads()}, medians of {R}, ms per forward+backward")
            print("| shape | tokens | dense | torch AbsTopK (4 sites) | tti AbsTopK (4 sites) | tti (all 9 sites) |")
            print("|---|---|---|---|---|---|")
            for d, layers, batch, seq in SHAPES:
                tokens = torch.randint(0, 257, (batch, seq + 1), generator=torch.Generator().manual_seed(1)).to(DEVICE)
                dense = step_ms(build(groups, d, layers), tokens)
                plain = build(groups, d, layers, abs_topk_fraction=0.25)
                for module in plain.modules():
                    if isinstance(module, AbsTopK) and module.active:
                        module.forward = lambda x, k=module.k: reference_abs_topk(x, k)
                torch_ms = step_ms(plain, tokens)
                tti_ms = step_ms(build(groups, d, layers, abs_topk_fraction=0.25), tokens)
                all_ms = step_ms(build(groups, d, layers, abs_topk_fraction=0.25, abs_topk_sites=ABS_TOPK_SITES),
                                 tokens)
                print(f"| d {d} x {layers} blocks | {batch * seq} | {dense:.1f} | {torch_ms:.1f} | {tti_ms:.1f} | "
                      f"{all_ms:.1f} |")
        finally:
            shutdown_parallel()


if __name__ == "__main__":
    main()
