"""Cost of the weight-sparsity mask per optimizer step, beside a plain-PyTorch top-k mask and
the Adam step it follows, on one process (TP=1), for the block matrices of a GPT of width d.

Per configuration (d, layers; four matrices per block: qkv [3d, d], proj [d, d], fc1 [4d, d],
fc2 [d, 4d]; density 0.25, min_per_neuron 4):
  adam      torch.optim.Adam.step() on those matrices (fp32, random gradients): the update the
            mask follows.
  torch     the plain PyTorch mask of the reference code: per matrix, torch.topk of |W|
            flattened (k = density x size) and a scatter into a bool mask (no minimum per
            neuron, ties unspecified).
  tti       tti_dist.models.weight_sparsity.abs_topk_masks: the exact, TP-ready radix select
            with min_per_neuron, all matrices in one call.
  apply     the multiply of the masks into the weights.
Times are medians of R repeats after one warm-up, in milliseconds.

    python bench/weight_sparsity_step.py [R] [DEVICE]     # default R = 5, DEVICE = cpu (or cuda)

Asserts nothing: record the printed lines in docs/performance.md.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from tti_dist.models.weight_sparsity import abs_topk_masks

R = int(sys.argv[1]) if len(sys.argv) > 1 else 5
DEVICE = torch.device(sys.argv[2] if len(sys.argv) > 2 else "cpu")
DENSITY = 0.25


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn) -> float:
    fn()
    sync()
    times = []
    for _ in range(R):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def plain_topk_masks(weights: list[torch.Tensor], ks: list[int]) -> list[torch.Tensor]:
    masks = []
    for w, k in zip(weights, ks):
        idx = torch.topk(w.abs().reshape(-1), k, sorted=False).indices
        mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
        mask[idx] = True
        masks.append(mask.view_as(w))
    return masks


def main() -> None:
    torch.manual_seed(0)
    print(f"device {DEVICE}, threads {torch.get_num_threads()}, density {DENSITY}, min_per_neuron 4, median of {R}")
    shapes_cpu = ((128, 2), (256, 4), (512, 4), (768, 2))
    for d, layers in shapes_cpu if DEVICE.type == "cpu" else shapes_cpu + ((1024, 12), (2048, 4)):
        shapes = [((3 * d, d), "column"), ((d, d), "row"), ((4 * d, d), "column"), ((d, 4 * d), "row")] * layers
        weights = [torch.nn.Parameter(torch.randn(*s, device=DEVICE)) for s, _ in shapes]
        parallels = [p for _, p in shapes]
        ks = [int(DENSITY * w.numel()) for w in weights]
        for w in weights:
            w.grad = torch.randn_like(w)
        adam = torch.optim.Adam(weights, lr=1e-3)
        t_adam = median_ms(adam.step)
        t_torch = median_ms(lambda: plain_topk_masks([w.data for w in weights], ks))
        t_tti = median_ms(lambda: abs_topk_masks([w.data for w in weights], parallels, ks, min_per_neuron=4))
        masks = abs_topk_masks([w.data for w in weights], parallels, ks, min_per_neuron=4)
        t_apply = median_ms(lambda: [w.data.mul_(m) for w, m in zip(weights, masks)])
        params = sum(w.numel() for w in weights)
        print(f"d {d:4d} x {layers} blocks ({params / 1e6:5.2f}M weights): adam {t_adam:7.1f} ms   "
              f"torch topk {t_torch:7.1f} ms   tti mask {t_tti:7.1f} ms   apply {t_apply:6.1f} ms", flush=True)


if __name__ == "__main__":
    main()
