"""The baseline for bench/throughput.py: the same GPT in plain PyTorch, trained the plain way.

Same shape as tti_dist's GPT (pre-norm blocks, fused QKV, SDPA causal attention, GELU MLP of
4d, learned positions, LayerNorm, output projection tied to the token embedding, vocabulary
padded to a multiple of 128, GPT-2 initialisation) and the same optimizer settings
(torch.optim.AdamW, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices only, fused on
CUDA, linear-warmup + cosine LambdaLR, gradient clipping at 1.0), but none of the framework:
no megatron-core layers, no DeepSpeed engine, no hookpoints, plain `F.cross_entropy` on the
full logits. This is what a researcher would write by hand (nanoGPT's train loop), so
tti/plain says what the framework costs per step.

Precision: fp32, or bf16 autocast with fp32 weights (the reference recipe; tti_dist's
DeepSpeed bf16 mode instead keeps bf16 weights with fp32 master copies in the optimizer).

    python bench/plain_gpt.py --preset smoke --steps 20      # alone; throughput.py runs it side by side
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import PRESETS, Shape  # noqa: E402  (the benchmarked shape, shared with throughput.py)

VOCAB_PAD_MULTIPLE = 128
"""tti_dist's model.vocab_pad_multiple default: the embedding has this many rows more or less."""


def padded_vocab(shape: Shape) -> int:
    return -(-shape.vocab // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE


class Block(nn.Module):
    def __init__(self, d: int, heads: int, layers: int, std: float = 0.02):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)
        for lin, s in ((self.qkv, std), (self.fc1, std), (self.proj, std / math.sqrt(2 * layers)),
                       (self.fc2, std / math.sqrt(2 * layers))):
            nn.init.normal_(lin.weight, 0.0, s)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(z.transpose(1, 2).reshape(B, T, D))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class PlainGPT(nn.Module):
    def __init__(self, shape: Shape, std: float = 0.02):
        super().__init__()
        self.wte = nn.Embedding(padded_vocab(shape), shape.hidden)
        self.wpe = nn.Embedding(shape.seq, shape.hidden)
        nn.init.normal_(self.wte.weight, 0.0, std)
        nn.init.normal_(self.wpe.weight, 0.0, std)
        self.blocks = nn.ModuleList(Block(shape.hidden, shape.heads, shape.layers) for _ in range(shape.layers))
        self.ln_f = nn.LayerNorm(shape.hidden)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.t()  # tied output projection


def build(shape: Shape, device: torch.device, *, lr: float = 3e-3, total_steps: int = 1000,
          warmup_steps: int = 10, compile_model: bool = False, seed: int = 1234):
    """(model, optimizer, scheduler) as nanoGPT-style code sets them up."""
    torch.manual_seed(seed)
    model = PlainGPT(shape).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    if compile_model:
        model.compile()
    return model, opt, sched


def make_step(model: nn.Module, opt, sched, *, bf16: bool, device: torch.device, grad_clip: float = 1.0):
    """The training step: forward, loss, backward, clip, AdamW step, LR step, zero grads."""
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step(tokens: torch.Tensor) -> torch.Tensor:
        with autocast():
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plain-PyTorch GPT training throughput (the baseline).")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = Shape(**PRESETS[args.preset])
    model, opt, sched = build(shape, device, compile_model=args.compile)
    step = make_step(model, opt, sched, bf16=args.bf16, device=device)
    tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq + 1), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(device)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = step(tokens)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    print(f"plain GPT {args.preset}: median step {1000 * median:.1f} ms, "
          f"{shape.batch * shape.seq / median:,.0f} tokens/s, final loss {loss.item():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
