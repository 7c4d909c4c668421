"""What the benchmarks share: hftrain's training loop set up as `hftrain train` sets it up,
and paired-step timing (the sides take turns one training step at a time, so noise on a
shared machine hits both alike; the figure reported is the median of the per-pair ratios)."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch
from accelerate import Accelerator

from hftrain.allocator import keep_freed_heap_memory
from hftrain.optim import build_optimizer, build_scheduler
from hftrain.train_state import TrainState
from hftrain.train_step import StepResult, TrainStep


class HftrainSteps:
    """`model` prepared by Accelerate with the recipe's optimizer and schedule, stepped as
    `hftrain.train.fit` steps it (`TrainStep`, the recurrent state carried from step to
    step); call `optimizer_step([batch])` to time a step, `state.add_step` to count it."""

    def __init__(self, recipe, model) -> None:
        self.accelerator = accelerator = Accelerator()
        keep_freed_heap_memory(accelerator.device)  # process-wide: the plain side gets it too
        optimizer = build_optimizer(model, recipe.train)
        scheduler = build_scheduler(optimizer, recipe.train)
        model, optimizer = accelerator.prepare(model, optimizer)
        self.train_step = TrainStep(accelerator, model, optimizer, scheduler, recipe.train)
        self.state = TrainState(None, accelerator.device)

    def optimizer_step(self, micro_batches) -> StepResult:
        result = self.train_step(micro_batches, self.state.recurrent)
        self.state.recurrent = result.recurrent
        return result


def paired_steps(sides: dict[str, Callable[[], None]], steps: int, warmup: int,
                 tokens_per_step: int) -> dict[str, list[float]]:
    """Time `steps` training steps of every side, one step each in turn (ABBA order), after
    `warmup` untimed steps each; return tokens/s of every step, per side.

    Interleaving single steps, rather than rounds of many, matters on a shared VM: a burst of
    stolen CPU lasts seconds, so it falls on both steps of a pair instead of on one side's
    whole round, and the median of the per-pair ratios ignores the pairs it spoils. On a GPU
    each step is timed until the device has finished it (kernels run asynchronously).
    """
    wait = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for run in sides.values():
        for _ in range(warmup):
            run()
    rates: dict[str, list[float]] = {name: [] for name in sides}
    order = list(sides.items())
    for i in range(steps):
        for name, run in order if i % 2 == 0 else reversed(order):
            wait()
            start = time.perf_counter()
            run()
            wait()
            rates[name].append(tokens_per_step / (time.perf_counter() - start))
    return rates


def report(rates: dict[str, list[float]], title: str) -> float:
    """Print each side's median tokens/s and the first side's speed relative to the second:
    the median over steps of the ratio within each pair (quartiles alongside)."""
    print(f"{title} | {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for name, values in rates.items():
        print(f"{name:8s}: {statistics.median(values):10,.0f} tokens/s median "
              f"over {len(values)} steps")
    first, second = rates.values()
    pair_ratios = [a / b for a, b in zip(first, second, strict=True)]
    q1, ratio, q3 = statistics.quantiles(pair_ratios, n=4)
    names = "/".join(rates)
    print(f"ratio {names}: {ratio:.3f} (median of per-step pairs; quartiles {q1:.3f}-{q3:.3f})")
    return ratio
