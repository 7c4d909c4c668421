"""Whole-run wall time: `hftrain train` against a nanoGPT-style run, on the same machine.

Issue 2 asks the Shakespeare char recipe to finish in no more than nanoGPT's CPU run plus
10%. nanoGPT's figure ("about 90 s") was taken on a machine like this one, but this machine's
speed drifts by 20-30% from hour to hour, so a single stopwatch reading cannot settle it.
This script runs both whole jobs as fresh processes, in alternating order, and reports the
ratio of median wall times.

The reference side (`--reference`) is written here from nanoGPT's published procedure for
`config/train_shakespeare_char.py` with its CPU command line (`--device=cpu --compile=False
--eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
--n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0`): its data preparation
(a character vocabulary, the first 90% trains), its model (pre-norm GPT without biases, tied
embeddings, SDPA attention, exact GELU, dropout modules at p=0), its loop (random windows,
AdamW betas (0.9, 0.99) unfused on CPU, warmup then cosine to 1e-4, clip 1.0 behind a disabled
GradScaler, a loss print every step, train and val estimated on 20 batches every 250 steps
and a checkpoint whenever val improves).

    python benchmarks/vs_nanogpt.py [--rounds 3] [--recipe RECIPE] [key=value ...]
    python benchmarks/vs_nanogpt.py --rounds 3 --ablation

`--recipe` and overrides time another hftrain recipe against the same reference (issue 13's
fast recipes); the hftrain side's final validation loss is reported too. For a recipe with
`data.block_size: 64` that loss is what `hftrain eval EXPORT --data <last 10%> --block-size
64` reports (64-token windows, each scored on its own, as nanoGPT's figure is).

`--ablation` times the fastest recipe (`recipes/shakespeare/qwen3-char-fast.yaml`), the
variants that each take one of its ingredients away, and the other Shakespeare char recipes
(ABLATION below), all in the same rounds as one reference run: each round runs every job
once, in an order that reverses from round to round. With many jobs a round lasts minutes, so
the table also gives each job's median of its per-round ratios to that round's reference;
the two medians differ by what drift within a round leaves. For a headline figure, time the
recipe alone against the reference (`--recipe`: the two jobs run back to back).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = "recipes/shakespeare/gpt2-char.yaml"
CORPUS = "recipes/data/tinyshakespeare.txt"


def reference_run(out_dir: Path, max_iters: int = 2000) -> None:
    """A nanoGPT-style shakespeare-char CPU run, end to end, in this process (`max_iters`
    shorter than nanoGPT's 2000 only for the smoke test: warmup and decay shrink with it)."""
    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    text = Path(CORPUS).read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = np.array([index[c] for c in text], dtype=np.uint16)
    cut = int(0.9 * len(ids))
    ids[:cut].tofile(out_dir / "train.bin")
    ids[cut:].tofile(out_dir / "val.bin")

    vocab, block, width, heads, layers, batch = len(chars), 64, 128, 4, 4, 12
    warmup, lr, min_lr = min(100, max_iters // 2), 1e-3, 1e-4

    class LayerNorm(nn.Module):  # nanoGPT's: F.layer_norm with an optional bias
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(width))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)

    class CausalSelfAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn = nn.Linear(width, 3 * width, bias=False)
            self.c_proj = nn.Linear(width, width, bias=False)
            self.resid_dropout = nn.Dropout(0.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, c = x.size()
            q, k, v = (z.view(b, t, heads, c // heads).transpose(1, 2)
                       for z in self.c_attn(x).split(width, dim=2))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0,
                                               is_causal=True)
            y = y.transpose(1, 2).contiguous().view(b, t, c)
            return self.resid_dropout(self.c_proj(y))

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_fc = nn.Linear(width, 4 * width, bias=False)
            self.gelu = nn.GELU()
            self.c_proj = nn.Linear(4 * width, width, bias=False)
            self.dropout = nn.Dropout(0.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1, self.attn = LayerNorm(), CausalSelfAttention()
            self.ln_2, self.mlp = LayerNorm(), MLP()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = nn.Embedding(vocab, width)
            self.wpe = nn.Embedding(block, width)
            self.drop = nn.Dropout(0.0)
            self.h = nn.ModuleList(Block() for _ in range(layers))
            self.ln_f = LayerNorm()
            self.lm_head = nn.Linear(width, vocab, bias=False)
            self.wte.weight = self.lm_head.weight
            for name, p in self.named_parameters():
                if p.dim() >= 2:
                    std = 0.02 / math.sqrt(2 * layers) if name.endswith("c_proj.weight") else 0.02
                    nn.init.normal_(p, 0.0, std)

        def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            pos = torch.arange(0, idx.size(1), dtype=torch.long)
            x = self.drop(self.wte(idx) + self.wpe(pos))
            for blk in self.h:
                x = blk(x)
            logits = self.lm_head(self.ln_f(x))
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                                   ignore_index=-1)

    def get_batch(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        data = np.memmap(out_dir / f"{split}.bin", dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - block, (batch,))
        x = torch.stack([torch.from_numpy(data[i:i + block].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block].astype(np.int64))
                         for i in ix])
        return x, y

    @torch.no_grad()
    def estimate_loss() -> dict[str, float]:
        model.eval()
        losses = {s: float(np.mean([model(*get_batch(s)).item() for _ in range(20)]))
                  for s in ("train", "val")}
        model.train()
        return losses

    def lr_at(it: int) -> float:
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        ratio = (it - warmup) / (max_iters - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(ratio, 1.0))) * (lr - min_lr)

    torch.manual_seed(1337)
    model = GPT()
    params = [p for p in model.parameters()]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.99))
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # nanoGPT's scaler, off on CPU
    best_val = float("inf")
    x, y = get_batch("train")
    t0 = time.time()
    for it in range(max_iters + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it)
        if it % 250 == 0:
            losses = estimate_loss()
            print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            if losses["val"] < best_val and it > 0:
                best_val = losses["val"]
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "iter_num": it, "best_val_loss": best_val}, out_dir / "ckpt.pt")
        loss = model(x, y)
        x, y = get_batch("train")
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        t1 = time.time()
        print(f"iter {it}: loss {loss.item():.4f}, time {(t1 - t0) * 1000:.2f}ms")
        t0 = t1
    print(f"final val loss (20 random batches): {estimate_loss()['val']:.4f}")


def timed(command: list[str]) -> tuple[float, float | None]:
    """Wall time of `command`, and the final validation loss it printed (hftrain's line)."""
    start = time.perf_counter()
    out = subprocess.run(command, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True).stdout
    seconds = time.perf_counter() - start
    loss = re.search(r"^validation: loss ([0-9.]+)", out, re.MULTILINE)
    return seconds, float(loss.group(1)) if loss else None


FAST = "recipes/shakespeare/qwen3-char-fast.yaml"
# The fast recipe's optimizer and schedule, for variants built from other recipes.
FAST_TRAINING = ["train.optimizer=muon", "train.max_steps=280", "train.muon_momentum=0.85",
                 "train.warmup_steps=20", "train.lr=3e-3", "train.min_lr=3e-4",
                 "eval.interval=1000", "sample.max_new_tokens=100"]
ABLATION: list[tuple[str, str, list[str]]] = [
    ("qwen3-char-fast.yaml (Qwen3-style + Muon, 280 steps)", FAST, []),
    ("- QK-norm: Llama block", FAST, ["model.arch=llama"]),
    ("- Muon: AdamW for every weight", FAST, ["train.optimizer=adamw"]),
    ("- short-run momentum: Muon's 0.95", FAST, ["train.muon_momentum=0.95"]),
    ("- grouped-query attention: 4 key-value heads", FAST, ["model.n_kv_head=4"]),
    ("- schedule: nanoGPT's warmup 100, lr 1e-3 to 1e-4", FAST,
     ["train.warmup_steps=100", "train.lr=1e-3", "train.min_lr=1e-4"]),
    ("- Qwen3-style block: GPT-2's (learned positions, LayerNorm, GELU MLP, no QK-norm, "
     "4 key-value heads)", RECIPE, FAST_TRAINING),
    ("llama-char-fast.yaml (Llama + Muon, 350 steps)",
     "recipes/shakespeare/llama-char-fast.yaml", []),
    ("llama-char.yaml (Llama + AdamW, 2000 steps)", "recipes/shakespeare/llama-char.yaml", []),
    ("gpt2-char.yaml (GPT-2 + AdamW, 2000 steps)", RECIPE, []),
]
REFERENCE = "nanoGPT-style reference"


def hftrain_command(recipe: str, overrides: list[str], run_dir: str) -> list[str]:
    """`hftrain train` with this interpreter (its environment, whatever is on PATH)."""
    return [sys.executable, "-m", "hftrain", "train", recipe, *overrides,
            f"run.output_dir={run_dir}"]


def run_rounds(jobs: dict[str, list[str]], rounds: int, scratch: str
               ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Every job once per round, the order reversed on every other round; wall times and the
    final validation losses the hftrain jobs printed."""
    times: dict[str, list[float]] = {name: [] for name in jobs}
    losses: dict[str, list[float]] = {name: [] for name in jobs}
    # Untimed: read the libraries into the page cache, which only the first job would pay for.
    subprocess.run([sys.executable, "-c", "import hftrain.train, torch"], check=True)
    for r in range(rounds):
        order = list(jobs) if r % 2 == 0 else list(reversed(jobs))
        for name in order:
            subprocess.run(["rm", "-rf", f"{scratch}/run"], check=True)
            seconds, loss = timed(jobs[name])
            times[name].append(seconds)
            if loss is not None:
                losses[name].append(loss)
            print(f"round {r + 1}: {name}: {seconds:.1f} s"
                  + (f", val loss {loss:.4f}" if loss is not None else ""), flush=True)
    return times, losses


def report(times: dict[str, list[float]], losses: dict[str, list[float]]) -> None:
    """A markdown table: median wall time, its ratio to the reference's, median val loss."""
    reference = statistics.median(times[REFERENCE])
    print("\n| job | median wall time (runs) | / reference | median of per-round ratios | "
          "final val loss |\n|---|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        paired = statistics.median([v / ref for v, ref in zip(values, times[REFERENCE],
                                                               strict=True)])
        loss = f"{statistics.median(losses[name]):.4f}" if losses[name] else "-"
        runs = ", ".join(f"{v:.1f}" for v in values)
        print(f"| {name} | {median:.1f} s ({runs}) | {median / reference:.3f}x | "
              f"{paired:.3f}x | {loss} |")
    print(f"(cpu count {os.cpu_count()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reference", metavar="DIR", help="run the reference job into DIR")
    parser.add_argument("--reference-iters", type=int, default=2000,
                        help="the reference's max_iters: nanoGPT's 2000 (fewer: smoke test)")
    parser.add_argument("--recipe", default=RECIPE, help="the hftrain recipe to time")
    parser.add_argument("--ablation", action="store_true",
                        help="time the fast recipe and its ablation variants (ABLATION)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for the recipe")
    args = parser.parse_args()
    if args.ablation and (args.recipe != RECIPE or args.overrides):
        parser.error("--ablation times its own jobs (ABLATION): drop --recipe and overrides")
    if args.reference:
        reference_run(Path(args.reference), args.reference_iters)
        return
    variants = ABLATION if args.ablation else [("hftrain", args.recipe, args.overrides)]
    with tempfile.TemporaryDirectory() as scratch:
        jobs = {name: hftrain_command(recipe, overrides, f"{scratch}/run")
                for name, recipe, overrides in variants}
        jobs[REFERENCE] = [sys.executable, __file__, "--reference", scratch,
                           "--reference-iters", str(args.reference_iters)]
        times, losses = run_rounds(jobs, args.rounds, scratch)
    report(times, losses)


if __name__ == "__main__":
    main()
