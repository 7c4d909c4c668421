"""A weighted mixture against one source of the same files: does drawing blocks from two
streams cost throughput?

    python benchmarks/mixture.py [--steps 200] [--warmup 20] [--shuffle-tokens 1500000]
    python benchmarks/mixture.py --steps 4 --warmup 1 --shuffle-tokens 4096   # smoke test

The data and model are recipes/mixture/gpt2-bpe-shakespeare-ptb.yaml's: Tiny Shakespeare and
the two PTB splits, a 1,024-token byte-level BPE learned from them (hftrain's builder), GPT-2
4x128, blocks of 64, batch 16. The sides:

- single: one source holding all three files (`data.train_files`);
- mixture: `data.sources` shakespeare (weight 0.7) and ptb (0.3), each with its own shuffle
  buffer of `--shuffle-tokens`.

Both read with data.num_workers 0, so each batch's whole cost (tokenizing its pieces,
packing, shuffling, drawing) is on the timed process: the worst case for the mixture, whose
pipeline work is done by workers in a real run. Reported, in one process, side by side:

1. the first batch's latency (the shuffle buffers filling: the mixture fills two);
2. the pipeline alone: batches per second, the sides taking turns 10 batches at a time;
3. training: tokens/s of `next(batches)` + one optimizer step, the sides taking turns one
   step at a time (`timing.paired_steps`); the figure is the median of per-pair ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import HftrainSteps, paired_steps, report  # noqa: E402

from hftrain.data import DataStreams, texts  # noqa: E402
from hftrain.models import build_model  # noqa: E402
from hftrain.recipe import DataConfig, load_recipe  # noqa: E402
from hftrain.tokenizer import build_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes/mixture/gpt2-bpe-shakespeare-ptb.yaml"


def sides(mixture: DataConfig) -> dict[str, DataConfig]:
    """The recipe's mixture, and one source of all its files (each source's hold-out kept:
    the single side holds out the first source's fraction of every file)."""
    files = [f for source in mixture.sources for f in source.train_files]
    single = dataclasses.replace(mixture, sources=[], train_files=files,
                                 val_fraction=mixture.sources[0].val_fraction)
    return {"mixture": mixture, "single": single}


def first_batch_seconds(config: DataConfig, tokenizer, batch_size: int) -> float:
    start = time.perf_counter()
    next(DataStreams(config, tokenizer, seed=1).train_batches(batch_size))
    return time.perf_counter() - start


def pipeline_rates(streams: dict, rounds: int, per_round: int) -> dict[str, list[float]]:
    """Batches per second of each side, alternating `per_round` batches at a time."""
    rates: dict[str, list[float]] = {name: [] for name in streams}
    order = list(streams.items())
    for i in range(rounds):
        for name, stream in order if i % 2 == 0 else reversed(order):
            start = time.perf_counter()
            for _ in range(per_round):
                next(stream)
            rates[name].append(per_round / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--shuffle-tokens", type=int, default=1_500_000)
    args = parser.parse_args()
    transformers.logging.disable_progress_bar()
    torch.manual_seed(0)
    recipe = load_recipe(RECIPE, [f"data.shuffle_tokens={args.shuffle_tokens}",
                                  "data.num_workers=0"])
    tokenizer = build_tokenizer(recipe.tokenizer, texts(recipe.data),
                                recipe.data.block_size, "benchmark corpus")
    configs = sides(recipe.data)
    batch = recipe.train.batch_size
    print("first batch (s): " + ", ".join(
        f"{name} {first_batch_seconds(config, tokenizer, batch):.2f}"
        for name, config in configs.items()))

    streams = {name: DataStreams(config, tokenizer, seed=1).train_batches(batch)
               for name, config in configs.items()}
    for stream in streams.values():
        for _ in range(args.warmup):
            next(stream)
    rates = pipeline_rates(streams, max(args.steps // 10, 2), 10)
    first, second = (statistics.median(r) for r in rates.values())
    print(f"pipeline alone, batches/s (median of {len(rates['mixture'])} rounds of 10): "
          f"mixture {first:,.0f}, single {second:,.0f}, ratio {first / second:.3f}")

    def step(name: str, stepper: HftrainSteps):
        def run() -> None:
            stepper.optimizer_step([next(streams[name])])
        return run

    steppers = {}
    for name in configs:
        torch.manual_seed(0)
        model = build_model(recipe.model, tokenizer, recipe.data.block_size)
        steppers[name] = HftrainSteps(recipe, model)
    tokens = batch * recipe.data.block_size
    timed = paired_steps({name: step(name, s) for name, s in steppers.items()},
                         args.steps, args.warmup, tokens)
    report(timed, f"training step with its batch, GPT-2 4x128, batch {batch} x "
                  f"{recipe.data.block_size}")
    for stream in streams.values():
        stream.close()


if __name__ == "__main__":
    main()
