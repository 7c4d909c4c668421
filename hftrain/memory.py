"""Will the run fit? A lower bound on the memory a training process allocates, checked against
what the machine has before anything large is allocated.

A typo in a size (`train.batch_size=100000000`, `model.n_embd=65536`, `data.shuffle_tokens=1e11`)
would otherwise run for minutes and then die in an allocator abort, a traceback or the kernel's
out-of-memory killer, which may take other processes with it. Accelerate's
`find_executable_batch_size` retries a failed step with smaller batches, which changes the run
the recipe describes; no library estimates a whole run (weights, optimizer, batch, buffers)
before it starts, so hftrain adds up the parts it knows.

Every part is a lower bound (the logits of one micro-batch, the residual stream each layer
keeps for the backward pass, weights, gradients and optimizer moments at their smallest
dtype), so a run is never refused that would have fit: the check catches the sizes that cannot
fit by orders of magnitude, not the last 10%.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hftrain.errors import HftrainError

OPTIMIZER_MOMENTS = {"adamw": 2, "adam": 2, "rmsprop": 1, "muon": 1, "sgd": 0, "adafactor": 0}
"""Tensors of a parameter's size each optimizer keeps (at least: Muon keeps AdamW's two for
the parameters it does not orthogonalise, SGD one with momentum; Adafactor's are factored)."""

TOKEN_BYTES = 8
"""Packed blocks are int64 token ids (`hftrain.data.packing`)."""


@dataclass(frozen=True)
class Need:
    """One part of a run's memory, and the recipe key that sets its size."""

    key: str
    value: Any
    what: str
    bytes: int


def model_sizes(fields: Any, tokenizer: Any, block_size: int) -> tuple[int, int, int] | None:
    """(parameters, layers, width) of the model a recipe describes, built on the meta device
    (no memory); None for an `init_from` model, whose size its own files fix."""
    if fields.init_from:
        return None
    from hftrain.models import MODELS

    with torch.device("meta"):
        model = MODELS[fields.arch].build(fields, tokenizer, block_size)
    config = model.config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", 1)
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    return sum(p.numel() for p in model.parameters()), int(layers), int(width)


def run_needs(recipe: Any, vocab_size: int, sizes: tuple[int, int, int] | None,
              shards: int = 1) -> tuple[list[Need], list[Need]]:
    """The parts held for the whole run, and those of one step (training or evaluation, the
    larger counts): each a lower bound, per process. `shards` divides what FSDP or ZeRO
    spreads over the processes."""
    train, data = recipe.train, recipe.data
    mixed = train.mixed_precision in ("bf16", "fp16")
    word = 2 if mixed else 4
    held = [Need("data.shuffle_tokens", data.shuffle_tokens, "shuffle buffer of token ids",
                 data.shuffle_tokens * TOKEN_BYTES)]
    step = [Need("train.batch_size", train.batch_size,
                 f"logits of one micro-batch ({train.batch_size} x {data.block_size} tokens x "
                 f"{vocab_size} ids)", train.batch_size * data.block_size * vocab_size * word),
            Need("eval.batch_size", recipe.eval.batch_size,
                 f"logits of one evaluation batch ({recipe.eval.batch_size} x "
                 f"{data.block_size} tokens x {vocab_size} ids)",
                 recipe.eval.batch_size * data.block_size * vocab_size * word)]
    if sizes is not None:
        parameters, layers, width = sizes
        trainable = 0 if recipe.model.lora_r else parameters
        copies = 1 + (trainable > 0) + OPTIMIZER_MOMENTS.get(train.optimizer, 0) * (trainable > 0)
        held.append(Need("model", f"{parameters:,} parameters",
                         f"weights, gradients and {train.optimizer} state",
                         copies * parameters * word // shards))
        step.append(Need("train.batch_size", train.batch_size,
                         f"activations of one micro-batch ({layers} layers x "
                         f"{train.batch_size} x {data.block_size} tokens x width {width})",
                         layers * train.batch_size * data.block_size * width * word))
    return held, step


def available_bytes(device: torch.device) -> int | None:
    """Memory this process may still allocate: free GPU memory, or on the CPU the machine's
    (or its cgroup's) available memory shared by this node's processes; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    limits = [free for free in (_meminfo_available(), _cgroup_available()) if free is not None]
    if not limits:
        return None
    return min(limits) // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    folder = Path("/sys/fs/cgroup")
    try:
        limit = (folder / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((folder / "memory.current").read_text())
    except (OSError, ValueError):
        return None


def check_fits(recipe: Any, vocab_size: int, sizes: tuple[int, int, int] | None,
               device: torch.device, shards: int = 1) -> None:
    """Refuse in one line a run whose lower-bound memory exceeds what is available, naming
    the key whose part is largest."""
    free = available_bytes(device)
    if free is None:
        return
    held, step = run_needs(recipe, vocab_size, sizes, shards)
    per_step = max(step, key=lambda need: need.bytes)
    total = sum(need.bytes for need in held) + sum(
        need.bytes for need in step if need.key == per_step.key)
    if total <= free:
        return
    worst = max([*held, *step], key=lambda need: need.bytes)
    raise HftrainError(
        f"this run needs at least {_size(total)} of memory per process and {_size(free)} is "
        f"available on {device.type}: {worst.key} ({worst.value}) alone needs "
        f"{_size(worst.bytes)} for the {worst.what}; make it smaller")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if value < 1000 or unit == "PB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")
