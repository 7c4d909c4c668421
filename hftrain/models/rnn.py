"""Recurrent causal LMs: recipe fields -> `RecurrentLMConfig` -> `RecurrentForCausalLM`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from hftrain.checks import at_least_one, in_unit_interval, non_negative
from hftrain.models.base import ModelFields

if TYPE_CHECKING:  # the model classes import torch.nn and more: seconds a data worker does without
    from transformers import PreTrainedTokenizerBase

    from hftrain.models.recurrent import RecurrentForCausalLM


@dataclass
class RecurrentFields(ModelFields):
    """The `model:` section of a recipe with `arch: lstm | gru | rnn_tanh | rnn_relu`."""

    supports_stateful: ClassVar[bool] = True
    """The recurrent state can carry across training windows (`train.stateful`)."""

    arch: Literal["lstm", "gru", "rnn_tanh", "rnn_relu"] = "lstm"
    """The recurrent cell: LSTM, GRU, or an Elman RNN with tanh or ReLU."""
    embedding_size: int = 200
    hidden_size: int = 200
    num_layers: int = 2
    embedding_dropout: float = 0.0
    """Dropout on the embedded tokens."""
    dropout: float = 0.2
    """Dropout between recurrent layers."""
    output_dropout: float = 0.2
    """Dropout on the last layer's output."""
    tie_embeddings: bool = True
    """Share the input embedding with the output layer (projected if hidden_size differs)."""
    init_range: float = 0.1
    """Embeddings and the output layer start from U(-init_range, init_range); >= 0."""

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least_one(self, "embedding_size", "hidden_size", "num_layers")
        in_unit_interval(self, "embedding_dropout", "dropout", "output_dropout")
        non_negative(self, "init_range")


def build_recurrent(
    fields: RecurrentFields, tokenizer: PreTrainedTokenizerBase, block_size: int
) -> RecurrentForCausalLM:
    """A freshly initialised recurrent LM; it has no maximum length, so block_size is unused."""
    from hftrain.models.recurrent import RecurrentForCausalLM, RecurrentLMConfig

    config = RecurrentLMConfig(
        vocab_size=len(tokenizer),
        cell=fields.arch,
        embedding_size=fields.embedding_size,
        hidden_size=fields.hidden_size,
        num_layers=fields.num_layers,
        embedding_dropout=fields.embedding_dropout,
        dropout=fields.dropout,
        output_dropout=fields.output_dropout,
        tie_word_embeddings=fields.tie_embeddings,
        initializer_range=fields.init_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return RecurrentForCausalLM(config)
