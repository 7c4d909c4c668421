"""Checkpoints: Accelerate's state plus the loop's position, written atomically, last K kept.

A checkpoint is `<run>/checkpoints/step-00000120/`: what `accelerator.save_state` writes
(model weights as safetensors, optimizer, the registered scheduler, every process's RNG
states) and `hftrain_state.json` (step, tokens seen, micro-batches consumed from the data
stream) with, for stateful recurrent training, the carried state in `loop_state.safetensors`.
It is written under a temporary name and renamed into place only when complete, so a crash
while saving never leaves a half checkpoint where `latest_checkpoint` would find it, and never
touches the previous one.

The data position is restored by replay: the seeded stream is rebuilt and the consumed
micro-batches are read again and dropped, which repeats tokenization but no model work and is
exact by construction (the same blocks, in the same order).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

STATE_FILE = "hftrain_state.json"
LOOP_TENSORS = "loop_state.safetensors"
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoints_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None. Temporary folders are never complete."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return None
    complete = [p for p in root.iterdir()
                if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return max(complete, key=lambda p: p.name, default=None)


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: dict[str, Any],
                    tensors: dict[str, torch.Tensor], keep: int) -> Path:
    """Write a checkpoint for `state["step"]` on every process; keep the newest `keep`."""
    root = checkpoints_root(run_dir)
    target = root / f"step-{state['step']:08d}"
    tmp = root / f".{target.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if tensors:
        rank = accelerator.process_index
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()},
                  tmp / f"rank{rank}_{LOOP_TENSORS}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))  # written last: "complete"
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        _prune(root, keep)
    accelerator.wait_for_everyone()
    return target


def _prune(root: Path, keep: int) -> None:
    complete = sorted(p for p in root.iterdir() if _NAME.match(p.name))
    for old in complete[:-keep]:
        shutil.rmtree(old)


def load_checkpoint(accelerator: Accelerator, path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore Accelerate's state from `path`; return the loop's state and carried tensors."""
    accelerator.load_state(str(path))
    state = json.loads((path / STATE_FILE).read_text())
    tensor_file = path / f"rank{accelerator.process_index}_{LOOP_TENSORS}"
    tensors = load_file(tensor_file) if tensor_file.exists() else {}
    return state, {name: t.to(accelerator.device) for name, t in tensors.items()}
