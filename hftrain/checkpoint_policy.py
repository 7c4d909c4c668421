"""When a run checkpoints: every `checkpoint.interval` steps, every `checkpoint.minutes`, when a
process is asked to stop, at the last step, and after a failure when that is safe. How a
checkpoint is written, checked and loaded is `hftrain.checkpoint.Checkpointer`'s.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from hftrain.checkpoint import Checkpointer, CheckpointError
from hftrain.errors import TrainingDiverged, one_line
from hftrain.launch import launch_trajectory
from hftrain.nodes import any_process
from hftrain.recipe import Recipe
from hftrain.resume import trajectory

STOP_CHECK_STEPS = 10
"""With several GPU processes, how often (in steps) they agree on a stop request."""


class RunCheckpoints:
    """The run's checkpoints: `Checkpointer` over the run's parts, saved with the trajectory a
    resume must match, at the moments the recipe and the run's events ask for."""

    def __init__(self, accelerator: Any, recipe: Recipe, run_dir: Path | None,
                 parts: dict[str, Any]) -> None:
        self.accelerator, self.recipe = accelerator, recipe
        self.checkpointer = Checkpointer(accelerator, run_dir, parts)
        self.last_save = time.monotonic()
        """When the last checkpoint was saved (or the run started): for `checkpoint.minutes`."""

    @property
    def latest(self) -> Path | None:
        """The run's newest complete checkpoint (one saved in the background counts once its
        manifest is written and it is renamed into place)."""
        return self.checkpointer.latest

    def holds(self, step: int) -> bool:
        return self.latest is not None and self.latest.name == f"step-{step:08d}"

    def load(self, path: Path) -> None:
        """Continue from a checkpoint: every part of the run's state as it was (the stream
        continues at the saved position without reading what came before; log records
        written after it, by the run that died or the final evaluation of a run being
        continued, are dropped)."""
        self.checkpointer.load(path)

    def save(self, step: int, keep: int | None = None, background: bool = False) -> Path:
        """Checkpoint every part of the run's state; with `background`, completed while
        training goes on (`Checkpointer.save`)."""
        saved = self.checkpointer.save(
            step, trajectory(self.recipe, launch_trajectory(self.accelerator)),
            keep or self.recipe.checkpoint.keep, background=background)
        self.last_save = time.monotonic()
        return saved

    def after_step(self, step: int, signum: int, sync_point: bool) -> bool:
        """Save what is due after `step` (the interval; the minutes; a stop request on any
        process: all save and stop after the same step) and say whether to stop."""
        every = self.recipe.checkpoint.interval
        saved = bool(every) and step % every == 0 and bool(self.save(step, background=True))
        stopping, due = any_process(self.accelerator, (bool(signum), self._minutes_passed()),
                                    sync_point or saved or step % STOP_CHECK_STEPS == 0)
        if (stopping or due) and not saved:
            self.save(step, background=True)
        return stopping

    def _minutes_passed(self) -> bool:
        minutes = self.recipe.checkpoint.minutes
        return minutes > 0 and time.monotonic() - self.last_save >= minutes * 60

    def settle(self) -> Path | None:
        """Wait for a checkpoint completing in the background; returns the newest complete
        one. For the paths where another failure is already being reported: a save that
        failed in the background is a warning here, not a second error. A Ctrl-C during the
        wait (a second or two of hashing) is held until the checkpoint is complete, so the
        run folder's lock is never let go while it is still being written."""
        interrupted = None
        while True:
            try:
                newest = self.checkpointer.wait()
                break
            except KeyboardInterrupt as exc:
                interrupted = exc
                print("hftrain: finishing the checkpoint being written ...", file=sys.stderr)
            except Exception as exc:  # noqa: BLE001 - reported beside the first failure
                print(f"hftrain: warning: {one_line(exc)}", file=sys.stderr)
                newest = self.latest
                break
        if interrupted is not None:
            raise interrupted
        return newest

    def after_failure(self, step: int, exc: Exception, data: Any, updating: bool) -> None:
        """Checkpoint the last completed step after a failure (reading data, evaluating,
        logging) when that is safe and new: not inside an update (`updating`: weights may be
        half updated), not with several processes (the others may wait in a collective), not
        after a failed save or a NaN stop. The failed step's batches go back to `data`."""
        self.settle()
        if (self.accelerator.num_processes > 1 or step == 0 or self.holds(step) or updating
                or isinstance(exc, (CheckpointError, TrainingDiverged))):
            return
        data.rollback_step()  # the failed step's batches were not trained on
        try:  # keep every earlier checkpoint too: this one was not planned
            self.save(step, keep=self.recipe.checkpoint.keep + 1)
        except CheckpointError:
            return
        except Exception as other:  # noqa: BLE001 - the failure being reported comes first
            print(f"hftrain: warning: could not checkpoint after the failure "
                  f"({one_line(other)})", file=sys.stderr)
