"""Model registry: a plain dict from the recipe's `model.arch` to its fields and builder.

A new architecture adds one entry: a dataclass describing its recipe fields (checked like every
other recipe section) and a function that turns those fields, the tokenizer and the block size
into a `PreTrainedModel`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from hftrain.models.gpt2 import GPT2Fields, build_gpt2
from hftrain.models.rnn import RecurrentFields, build_recurrent


class ModelSpec(NamedTuple):
    fields: type
    build: Callable[..., Any]


MODELS: dict[str, ModelSpec] = {
    "gpt2": ModelSpec(GPT2Fields, build_gpt2),
    "lstm": ModelSpec(RecurrentFields, build_recurrent),
    "gru": ModelSpec(RecurrentFields, build_recurrent),
    "rnn_tanh": ModelSpec(RecurrentFields, build_recurrent),
    "rnn_relu": ModelSpec(RecurrentFields, build_recurrent),
}


def build_model(fields: Any, tokenizer: Any, block_size: int) -> Any:
    """Build the model a recipe's `model:` section describes."""
    return MODELS[fields.arch].build(fields, tokenizer, block_size)
