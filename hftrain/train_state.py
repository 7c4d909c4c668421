"""The run's resumable state besides Accelerate's (weights, optimizer, RNG) and the schedule:
the loop's counters, the current log window, the recurrent state carried across windows and
the training stream's position, saved and restored as one unit (litgpt's `state` dict,
torchtitan's per-rank data loader state).

The log window's sums stay on the device between log lines (`window_loss`,
`window_steps`, `window_skipped`): adding to them never waits for the device, and reading
them once per log line is the loop's only host-device synchronisation between checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch

from hftrain.checkpoint import CheckpointError

COUNTERS = ("step", "tokens_seen", "micro_batches", "skipped_steps", "window_tokens")


class TrainState:
    """Counters, log window, recurrent state and data position of one process."""

    def __init__(self, data: Any, device: torch.device) -> None:
        self.data = data
        """The training stream: `state_dict()` / `load_state_dict()` give its exact position."""
        self.step = 0
        self.tokens_seen = 0
        self.micro_batches = 0
        """Micro-batches consumed from the training stream (step x grad_accum_steps)."""
        self.skipped_steps = 0
        """Steps whose update was skipped for a non-finite loss, up to the last log line."""
        self.window_tokens = 0
        self.window_loss = torch.zeros((), device=device)
        self.window_steps = torch.zeros((), dtype=torch.int64, device=device)
        """Steps of the window with a finite loss (those the mean loss is over)."""
        self.window_skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.window_first_skipped = torch.zeros((), dtype=torch.int64, device=device)
        """The first step of the window whose loss was not finite (0: none)."""
        self.recurrent: tuple[torch.Tensor, ...] | None = None

    def add_step(self, loss: torch.Tensor, finite: torch.Tensor, n_tokens: int,
                 n_micro_batches: int) -> None:
        """Count one optimizer step (on the device: no synchronisation)."""
        self.step += 1
        self.micro_batches += n_micro_batches
        self.tokens_seen += n_tokens
        self.window_tokens += n_tokens
        self.window_loss += torch.where(finite, loss, torch.zeros_like(loss))
        self.window_steps += finite.long()
        self.window_skipped += (~finite).long()
        first = self.window_first_skipped
        self.window_first_skipped = torch.where((first == 0) & ~finite, self.step, first)

    def close_window(self) -> tuple[torch.Tensor, int, int, int]:
        """The window's summed loss (a device tensor), its finite steps, its skipped steps
        and the first of those (read from the device: one synchronisation); start a new
        window."""
        loss = self.window_loss.clone()
        counts = torch.stack([self.window_steps, self.window_skipped, self.window_first_skipped])
        steps, skipped, first_skipped = (int(n) for n in counts.tolist())
        self.skipped_steps += skipped
        for tensor in (self.window_loss, self.window_steps, self.window_skipped,
                       self.window_first_skipped):
            tensor.zero_()
        self.window_tokens = 0
        return loss, steps, skipped, first_skipped

    def state_dict(self) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
        """(counters for the JSON state file, tensors for this rank's safetensors file)."""
        counters = {name: getattr(self, name) for name in COUNTERS}
        counters["window_steps"] = int(self.window_steps.item())
        tensors = {"window_loss": self.window_loss, "window_steps": self.window_steps,
                   "window_skipped": self.window_skipped,
                   "window_first_skipped": self.window_first_skipped, **self.data.state_dict()}
        tensors.update({f"state_{i}": t for i, t in enumerate(self.recurrent or ())})
        return counters, tensors

    def load_state_dict(self, counters: dict[str, Any], tensors: dict[str, torch.Tensor],
                        where: str) -> None:
        if "data.position" not in tensors or "window_first_skipped" not in tensors:
            raise CheckpointError(f"{where} was written by an older hftrain, which kept no data "
                                  "position; it cannot be resumed by this version")
        for name in COUNTERS:
            setattr(self, name, counters[name])
        self.window_loss = tensors["window_loss"]
        self.window_steps = tensors["window_steps"]
        self.window_skipped = tensors["window_skipped"]
        self.window_first_skipped = tensors["window_first_skipped"]
        self.data.load_state_dict({k: v for k, v in tensors.items() if k.startswith("data.")})
        n_states = sum(1 for name in tensors if name.startswith("state_"))
        self.recurrent = tuple(tensors[f"state_{i}"] for i in range(n_states)) or None
