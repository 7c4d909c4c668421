"""What the benchmarks share: hftrain's training loop set up as `hftrain train` sets it up,
and alternating-rounds timing (noise on a shared machine hits both sides alike; the figure
reported is the ratio of median throughputs)."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch
from accelerate import Accelerator

from hftrain.optim import build_optimizer, build_scheduler
from hftrain.tracking import MetricsLog
from hftrain.train import TrainingLoop


def hftrain_loop(recipe, model, streams) -> TrainingLoop:
    """`model` prepared by Accelerate with the recipe's optimizer and schedule, in the loop
    hftrain trains with (no logging); call `optimizer_step([batch])` to time a step."""
    accelerator = Accelerator()
    optimizer = build_optimizer(model, recipe.train)
    scheduler = build_scheduler(optimizer, recipe.train)
    model, optimizer = accelerator.prepare(model, optimizer)
    return TrainingLoop(recipe, accelerator, model, optimizer, scheduler, streams,
                        MetricsLog(None, enabled=False), byte_lengths=None)


def alternating_rounds(sides: dict[str, Callable[[], None]], rounds: int,
                       tokens_per_round: int) -> dict[str, list[float]]:
    """Run every side once to warm up, then `rounds` rounds each, in alternating order;
    return tokens/s of every round, per side."""
    for run in sides.values():
        run()
    rates: dict[str, list[float]] = {name: [] for name in sides}
    order = list(sides.items())
    for r in range(rounds):
        for name, run in order if r % 2 == 0 else reversed(order):
            start = time.perf_counter()
            run()
            rates[name].append(tokens_per_round / (time.perf_counter() - start))
    return rates


def report(rates: dict[str, list[float]], title: str) -> float:
    """Print each side's median and rounds and the first side's ratio to the second."""
    print(f"{title} | {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, values in rates.items():
        rounds = ", ".join(f"{x:,.0f}" for x in values)
        print(f"{name:8s}: {medians[name]:10,.0f} tokens/s  (rounds: {rounds})")
    first, second = list(medians)
    ratio = medians[first] / medians[second]
    print(f"ratio {first}/{second}: {ratio:.3f}")
    return ratio
