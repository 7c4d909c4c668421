"""GPT-2-style causal LM: recipe fields -> `GPT2Config` -> `GPT2LMHeadModel`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from hftrain.checks import at_least_one, in_unit_interval
from hftrain.models.base import ModelFields

if TYPE_CHECKING:  # the model classes import torch.nn and more: seconds a data worker does without
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerBase


@dataclass
class GPT2Fields(ModelFields):
    """The `model:` section of a recipe with `arch: gpt2`."""

    supports_stateful: ClassVar[bool] = False

    arch: Literal["gpt2"] = "gpt2"
    n_layer: int = 4
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 128
    """Width of the residual stream."""
    dropout: float = 0.0
    """Applied to embeddings, attention weights and residual branches."""
    activation: Literal["gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu"] = "gelu"
    """MLP activation. `gelu` (exact, fused) is nanoGPT's choice and the fastest on CPU;
    `gelu_new` is OpenAI GPT-2's tanh formula, written out op by op in transformers."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel; `sdpa` picks flash/memory-efficient kernels where PyTorch has them."""
    tie_embeddings: bool = True
    """Share the input embedding with the output projection, as GPT-2 does."""

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least_one(self, "n_layer", "n_head", "n_embd")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        in_unit_interval(self, "dropout")


def build_gpt2(
    fields: GPT2Fields, tokenizer: PreTrainedTokenizerBase, block_size: int
) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 sized for the tokenizer's vocabulary and the recipe's block."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=block_size,
        n_ctx=block_size,  # what GPT-2's own config.json carries, and converters read
        n_embd=fields.n_embd,
        n_layer=fields.n_layer,
        n_head=fields.n_head,
        activation_function=fields.activation,
        resid_pdrop=fields.dropout,
        embd_pdrop=fields.dropout,
        attn_pdrop=fields.dropout,
        tie_word_embeddings=fields.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel._from_config(config, attn_implementation=fields.attn_implementation)
