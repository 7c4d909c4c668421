"""Errors caused by the user's input. The CLI prints them as one line, without a traceback."""


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
