"""Activation checkpointing: peak memory and step time with and without it, same run.

Each side trains hftrain's GPT-2 (built by `hftrain.models.build_model`, stepped by
`TrainStep` as `hftrain train` steps it, AdamW) on the same random batches in a fresh
process of its own, so that its peak resident memory (`ru_maxrss`: weights, gradients,
AdamW's moments, activations, logits) is its own. Sides alternate off, on, on, off, ... so
that a noisy stretch of a shared machine falls on both. The figures that matter are the
ratios: checkpointed over plain, for peak memory and for the median step time.

    python benchmarks/activation_checkpointing.py [--n-layer 12 --n-embd 768 --n-head 12]
        [--block 1024 --batch 1 --vocab 50257 --steps 2 --rounds 2]

The defaults are GPT-2 124M at its full context. On a GPU run it under
`accelerate launch`: the peak is then also read from `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


def side(args: argparse.Namespace) -> dict[str, float]:
    """One side, in this process: build, warm up one step, time `steps` steps."""
    from timing import HftrainSteps

    from hftrain.models import build_model
    from hftrain.recipe import recipe_from_dict

    recipe = recipe_from_dict({
        "model": {"arch": "gpt2", "n_layer": args.n_layer, "n_head": args.n_head,
                  "n_embd": args.n_embd},
        "data": {"block_size": args.block},
        "train": {"batch_size": args.batch, "optimizer": "adamw", "warmup_steps": 0,
                  "gradient_checkpointing": args.side == "on"}})
    torch.manual_seed(0)
    model = build_model(recipe.model, VocabularyOnly(args.vocab), args.block,
                        recipe.train.gradient_checkpointing)
    steps = HftrainSteps(recipe, model)
    device = steps.accelerator.device
    ids = torch.randint(0, args.vocab, (args.batch, args.block + 1), device=device)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    wait = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds = []
    for i in range(args.steps + 1):  # the first builds AdamW's state: not timed
        start = time.perf_counter()
        steps.optimizer_step([batch])
        wait()
        if i:
            seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    return {"step_s": statistics.median(seconds), "peak_gb": peak / 1e9}


class VocabularyOnly:
    """What the model builder reads from a tokenizer: the vocabulary's size and the special
    ids (GPT-2's vocabulary size without GPT-2's tokenizer, which is not shipped offline)."""

    bos_token_id = eos_token_id = pad_token_id = 0

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


def run_side(name: str, argv: list[str]) -> dict[str, float]:
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--side", name],
                         capture_output=True, text=True, check=True, cwd=here)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--n-head", type=int, default=12)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per side and round")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of fresh processes")
    parser.add_argument("--side", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(side(args)))
        return
    argv = sys.argv[1:]
    results: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    for i in range(args.rounds):
        for name in ("off", "on") if i % 2 == 0 else ("on", "off"):
            results[name].append(run_side(name, argv))
    report(args, results)


def report(args: argparse.Namespace, results: dict[str, list[dict[str, float]]]) -> None:
    print(f"GPT-2 {args.n_layer} layers x {args.n_embd}, block {args.block}, batch {args.batch},"
          f" vocab {args.vocab} | {args.rounds} rounds x {args.steps} steps | "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    figures = {}
    for name, rounds in results.items():
        step = statistics.median(r["step_s"] for r in rounds)
        peak = max(r["peak_gb"] for r in rounds)
        figures[name] = (step, peak)
        label = "checkpointed" if name == "on" else "plain"
        print(f"{label:12s}: {step:8.3f} s/step median, peak memory {peak:6.2f} GB")
    (step_on, peak_on), (step_off, peak_off) = figures["on"], figures["off"]
    print(f"ratio checkpointed/plain: peak memory {peak_on / peak_off:.3f}, "
          f"step time {step_on / step_off:.3f}")


if __name__ == "__main__":
    main()
