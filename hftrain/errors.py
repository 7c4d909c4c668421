"""hftrain's own exceptions. Errors caused by the user's input (HftrainError) print as one line,
without a traceback; ResumableError and RunStopped carry what the CLI says about resuming."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path


class HftrainError(Exception):
    """Base class: a mistake in a recipe, a path or the data that the user can fix."""


class RecipeError(HftrainError):
    """A recipe key, value or type is wrong. The message names the key and the file."""


class DataError(HftrainError):
    """A data source is missing, empty or too short for the recipe. The message names the path."""


class RecordError(DataError):
    """One row of a data stream is unusable (a null text, a malformed fine-tuning record).

    Raised where the row is read, which does not know its file or line; `hftrain.data` turns
    it into a DataError that names them (see `hftrain.data_check`)."""


class TrainingDiverged(HftrainError):
    """The loss became NaN or infinite. The message names the step and the checkpoint kept."""


class ReportedByMainProcess(HftrainError):
    """On the other processes of a multi-process run: the main process refused (a changed
    recipe, a folder in use) and printed why; this one exits with the same status, quietly."""


class ResumableError(Exception):
    """A run failed after its state was checkpointed: `cause` is the failure (bad data, a full
    disk, a bug) and `checkpoint` the newest complete checkpoint, from which `--resume`
    continues once the cause is fixed. Raised by `hftrain.train.train`; the CLI only formats
    it: a user's mistake (an HftrainError) as one line, anything else as its own traceback,
    each with the command that resumes."""

    def __init__(self, cause: Exception, checkpoint: Path) -> None:
        super().__init__(f"{one_line(cause)} (the run is saved at {checkpoint})")
        self.cause = cause
        self.checkpoint = checkpoint

    def __reduce__(self) -> tuple[type, tuple[Exception, Path]]:
        return type(self), (self.cause, self.checkpoint)


class RunStopped(BaseException):
    """SIGTERM or Ctrl-C after training ended (final evaluation, export, sample, push): the
    run's final checkpoint is already written, so the process stops at once. A BaseException,
    like KeyboardInterrupt, so that no `except Exception` swallows it."""

    def __init__(self, signum: int, phase: str, advice: str | None = None) -> None:
        super().__init__(f"signal {signum} during {phase}")
        self.signum = signum
        self.phase = phase
        self.advice = advice
        """What the user should do next, when it is not `--resume` (the run had finished)."""


def one_line(exc: BaseException) -> str:
    """An HftrainError's own line; for anything else `Type: first line of its message` (what a
    damaged or planted file, or a failure on another process, raised)."""
    if isinstance(exc, HftrainError):
        return str(exc)
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


@contextmanager
def naming_the_recipe(recipe_path: Path | None) -> Iterator[None]:
    """The model's and the optimizer's refusals name recipe keys (`model.init_from`,
    `train.optimizer`); add the file, as the recipe loader does for its own."""
    try:
        yield
    except RecipeError:
        raise
    except HftrainError as exc:
        if recipe_path is None:
            raise
        raise RecipeError(f"{recipe_path}: {exc}") from None
