"""Errors caused by the user's input. The CLI prints them as one line, without a traceback."""


class HftrainError(Exception):
    """Base class: a mistake in a recipe, a path or the data that the user can fix."""


class RecipeError(HftrainError):
    """A recipe key, value or type is wrong. The message names the key and the file."""


class DataError(HftrainError):
    """A data source is missing, empty or too short for the recipe. The message names the path."""


class TrainingDiverged(HftrainError):
    """The loss became NaN or infinite. The message names the step and the checkpoint kept."""
