"""`TrainBatches`: what every training stream is to the loop and the checkpoint.

A training stream is an endless iterator of batches with an exact position: `state_dict()`
gives it as tensors (a checkpoint part), `load_state_dict()` continues from it without
replaying what came before. `peek()` pulls the next batch early (to check the data before a
run writes anything) while the position stays before it. `begin_step()` / `end_step()` bracket
a training step, and `rollback_step()` puts the position back to where an unfinished step
started: a step that fails part-way (a bad record in its third micro-batch, an out-of-memory
forward) has drawn batches it never trained on, and the checkpoint written after the failure
must not count them as read.

The streams differ only in where blocks come from and how they are laid out: pieces tokenized
by workers and shuffled (`loader.TrainStream`), one token array in recurrent lanes
(`loader.LaneStream`), a memory-mapped token cache (`cache.CachedStream`). Each says how to
make its next batch and what its position is; this base holds the rest once.
"""

from __future__ import annotations

from typing import Any

import torch


class TrainBatches:
    """An endless, resumable stream of training batches (see the module docstring).

    A stream implements `_next_batch`, `_position` / `_load_position` (its position as
    tensors) and `_snapshot` / `_restore` (its position as Python objects, cheap to copy:
    taken at every step), and `close` if it holds workers."""

    _pending: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None
    """A batch pulled by `peek`, with the position before it."""
    _step_start: Any = None

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._pending is not None:
            batch, self._pending = self._pending[0], None
            return batch
        return self._next_batch()

    def peek(self) -> dict[str, Any]:
        """The next batch, which `next` will return again; the position stays before it."""
        if self._pending is None:
            position = self.state_dict()
            self._pending = (self._next_batch(), position)
        return self._pending[0]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The position as tensors (saved per rank with the checkpoint)."""
        return self._pending[1] if self._pending is not None else self._position()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from a saved position (a peeked batch is dropped)."""
        self._pending = None
        self._load_position(state)

    def begin_step(self) -> None:
        self._step_start = (self._snapshot(), self._pending)

    def end_step(self) -> None:
        self._step_start = None

    def rollback_step(self) -> None:
        """Back to the start of the unfinished step (if one is open); workers restart."""
        if self._step_start is not None:
            snapshot, self._pending = self._step_start
            self._restore(snapshot)
            self._step_start = None
            self.close()

    def close(self) -> None:
        """Stop the stream's workers, if it has any (they restart on the next batch)."""

    def _next_batch(self) -> dict[str, Any]:
        raise NotImplementedError

    def _position(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _load_position(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def _snapshot(self) -> Any:
        raise NotImplementedError

    def _restore(self, snapshot: Any) -> None:
        raise NotImplementedError
