"""What checkpoint safety costs: hftrain's `Checkpointer.save` (Accelerate's `save_state` plus
the schedule as JSON, the loop tensors, a SHA-256 manifest and an atomic rename) against a bare
`accelerator.save_state`, on GPT-2 124M with its AdamW state; and the manifest check a resume
runs before loading. The two saves alternate (ABBA), each after `os.sync()`, so neither pays for
the other's writeback and a burst of load on a shared machine hits both.
The stall is how long training waits: a save in the loop (`background=True`) returns once the
files are written, and its manifest and rename complete on a thread (timed to `wait()`). The
disk's speed swings between calls here (page-cache reclaim), so the stall is also given
against the `save_state` call inside the same save.

    python benchmarks/checkpoint.py [--rounds 4] [--dir /tmp/ckpt-bench] [--tiny]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import GPT2Config, GPT2LMHeadModel

from hftrain.checkpoint import Checkpointer, damage
from hftrain.optim import build_scheduler
from hftrain.recipe import TrainConfig
from hftrain.tracking import MetricsLog
from hftrain.train_state import DataFiles


def gpt2_124m_with_adam_state(accelerator: Accelerator, tiny: bool = False):
    config = GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, n_positions=1024)
    if tiny:  # the smoke test's: seconds, not minutes
        config = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=50304, n_positions=64)
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 50304, (1, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()  # creates exp_avg / exp_avg_sq: the optimizer file is 2x the weights
    optimizer.zero_grad(set_to_none=True)
    scheduler = build_scheduler(optimizer, TrainConfig(max_steps=1000, warmup_steps=10))
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, scheduler


class LoopCounters:
    """The loop's part of the state, as small as the real one (`TrainState`)."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": 0, "micro_batches": self.step,
                "skipped_steps": 0, "window_tokens": 0, "window_loss": torch.zeros(())}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--dir", default="/tmp/ckpt-bench")
    parser.add_argument("--tiny", action="store_true", help="a 1-layer GPT-2 (smoke test)")
    args = parser.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler = gpt2_124m_with_adam_state(accelerator, args.tiny)
    params = sum(p.numel() for p in model.parameters())
    loop = LoopCounters()
    trajectory = {"train.grad_accum_steps": 1}
    bare, stall, complete, verify, load, inside = [], [], [], [], [], []
    save_state = accelerator.save_state

    def timed_save_state(*args, **kwargs):  # hftrain's own call, timed inside its save
        t0 = time.perf_counter()
        result = save_state(*args, **kwargs)
        inside.append(time.perf_counter() - t0)
        return result

    for i in range(args.rounds):
        checkpointer = Checkpointer(accelerator, root / f"run-{i}",
                                    {"loop": loop, "scheduler": scheduler,
                                     "metrics": MetricsLog(None, enabled=False),
                                     "data_files": DataFiles({}, is_main_process=True)})
        loop.step = i + 1
        for side in ("bare", "hftrain") if i % 2 == 0 else ("hftrain", "bare"):
            os.sync()  # each save starts with the other's 1.5 GB written back, not dirty
            t0 = time.perf_counter()
            if side == "bare":
                accelerator.save_state(str(root / f"bare-{i}"))
                bare.append(time.perf_counter() - t0)
                continue
            accelerator.save_state = timed_save_state
            path = checkpointer.save(loop.step, trajectory, keep=1, background=True)
            stall.append(time.perf_counter() - t0)
            accelerator.save_state = save_state
            checkpointer.wait()
            complete.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert damage(path) is None
        verify.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        checkpointer.load(path)
        load.append(time.perf_counter() - t0)
        size = sum(f.stat().st_size for f in path.iterdir())
        shutil.rmtree(root / f"bare-{i}")
        shutil.rmtree(root / f"run-{i}")
    shutil.rmtree(root, ignore_errors=True)
    med = statistics.median
    name = "a 1-layer GPT-2" if args.tiny else "GPT-2 124M"
    print(f"{name} ({params / 1e6:.1f} M parameters), AdamW state, {args.rounds} rounds")
    print(f"accelerator.save_state:      {med(bare):.2f} s (median)")
    print(f"hftrain Checkpointer.save, stall:  {med(stall):.2f} s (median), "
          f"ratio {med(s / b for s, b in zip(stall, bare, strict=True)):.2f}x")
    print(f"  its own save_state call:   {med(inside):.2f} s (median); stall / that: "
          f"{med(s / i for s, i in zip(stall, inside, strict=True)):.3f}x")
    print(f"hftrain Checkpointer.save, until complete: {med(complete):.2f} s (median), "
          f"ratio {med(c / b for c, b in zip(complete, bare, strict=True)):.2f}x")
    print(f"manifest check (resume):     {med(verify):.2f} s; Checkpointer.load {med(load):.2f} s")
    print(f"checkpoint size: {size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
