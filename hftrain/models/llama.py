"""Llama-style decoders (rotary positions, RMSNorm, gated SiLU MLP, grouped-query attention)
from transformers' own classes: recipe fields -> `LlamaConfig` / `Qwen3Config` ->
`AutoModelForCausalLM.from_config`. Qwen3 is the same block with RMSNorm on queries and keys
(QK-norm), which its modeling code applies by itself.

The two families share their fields (`DecoderFields`) and their builder (`build_decoder`); each
subclass only names its config class. Exports are plain `LlamaForCausalLM` /
`Qwen3ForCausalLM` folders that load without remote code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from hftrain.checks import at_least_one, in_unit_interval, positive
from hftrain.models.base import ModelFields

if TYPE_CHECKING:  # the model classes import torch.nn and more: seconds a data worker does without
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class RopeScaling:
    """`model.rope_scaling`: rotary positions stretched past the length a model learned, with
    transformers' own rope types: `linear` (position interpolation), `yarn` and `llama3`
    (each frequency band scaled by how many turns it makes within the learned length).
    transformers' `dynamic` type reads the learned length from `max_position_embeddings`
    itself, which hftrain uses as the model's position limit: not offered."""

    type: Literal["linear", "yarn", "llama3"] = "yarn"
    factor: float = 4.0
    """How many times the learned length the positions stretch to; >= 1."""
    original_max_position_embeddings: int | None = None
    """The length the model learned; unset: `init_from`'s positions (a fresh model:
    data.block_size). yarn and llama3 read it."""
    low_freq_factor: float = 1.0
    """llama3 only: wavelengths longer than original / low_freq_factor are fully scaled."""
    high_freq_factor: float = 4.0
    """llama3 only: wavelengths shorter than original / high_freq_factor are kept."""

    def __post_init__(self) -> None:
        if not self.factor >= 1:
            raise ValueError(f"factor must be >= 1 (a stretch, not a squeeze), got {self.factor}")
        at_least_one(self, "original_max_position_embeddings")
        positive(self, "low_freq_factor", "high_freq_factor")
        if not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(f"high_freq_factor ({self.high_freq_factor}) must be greater than "
                             f"low_freq_factor ({self.low_freq_factor})")

    def rope_parameters(self, theta: float, learned: int) -> dict[str, Any]:
        """transformers' `rope_parameters` for this scaling; `learned` is the default for
        `original_max_position_embeddings`."""
        params: dict[str, Any] = {"rope_type": self.type, "rope_theta": theta,
                                  "factor": float(self.factor)}
        if self.type in ("yarn", "llama3"):
            params["original_max_position_embeddings"] = \
                self.original_max_position_embeddings or learned
        if self.type == "llama3":
            params.update(low_freq_factor=float(self.low_freq_factor),
                          high_freq_factor=float(self.high_freq_factor))
        return params


@dataclass
class DecoderFields(ModelFields):
    """What the `model:` sections of the Llama-style architectures share."""

    supports_stateful: ClassVar[bool] = False
    config_class: ClassVar[str] = "LlamaConfig"
    """The transformers config class the fields are written into."""

    n_layer: int = 4
    """Transformer blocks (config `num_hidden_layers`)."""
    n_head: int = 4
    """Query heads per block (config `num_attention_heads`)."""
    n_kv_head: int | None = None
    """Key/value heads (config `num_key_value_heads`), shared by groups of query heads
    (grouped-query attention); must divide n_head. Unset: n_head (multi-head attention)."""
    n_embd: int = 128
    """Width of the residual stream (config `hidden_size`)."""
    head_dim: int | None = None
    """Width of each attention head, even (rotary positions rotate pairs). Unset: n_embd /
    n_head, which must then divide evenly."""
    intermediate_size: int | None = None
    """Width of the gated MLP. Unset: 8/3 x n_embd rounded up to a multiple of 32 (352 for
    width 128), which gives the three gated matrices about the weights of GPT-2's two 4x ones."""
    rope_theta: float = 10000.0
    """Base of the rotary position frequencies, >= 1 (below 1 the "slow" rotations turn
    faster than the fast ones, and a tiny base underflows to 0 in float32)."""
    rms_norm_eps: float = 1e-5
    """Epsilon of the RMSNorm layers, in (0, 1)."""
    dropout: float = 0.0
    """Dropout on the attention weights (config `attention_dropout`); these models have no
    other dropout."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel; `sdpa` picks flash/memory-efficient kernels where PyTorch has them."""
    tie_embeddings: bool = True
    """Share the input embedding with the output projection (as GPT-2 and the small Llama 3.2
    and Qwen3 models do)."""
    max_position_embeddings: int | None = None
    """Positions the model may attend over (its export's limit for `hftrain eval` and
    `generate`); unset: data.block_size for a fresh model, `init_from`'s own for a loaded one.
    At least data.block_size. Raising it for a loaded model is what `rope_scaling` is for."""
    rope_scaling: RopeScaling | None = None
    """Stretch the rotary positions (see `RopeScaling`), e.g. to fine-tune a model learned at
    64 tokens on 256: `{type: yarn, factor: 4}` with `max_position_embeddings: 256`."""

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least_one(self, "n_layer", "n_head", "n_kv_head", "n_embd", "head_dim",
                     "intermediate_size", "max_position_embeddings")
        positive(self, "rms_norm_eps")
        if not self.rope_theta >= 1:
            raise ValueError(f"rope_theta must be >= 1, got {self.rope_theta}")
        if not self.rms_norm_eps < 1:
            raise ValueError(f"rms_norm_eps must be < 1, got {self.rms_norm_eps}")
        in_unit_interval(self, "dropout")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head "
                             f"({self.n_head}), or set head_dim")
        if self.head_dim is not None and self.head_dim % 2:
            raise ValueError(f"head_dim must be even (rotary positions rotate pairs), "
                             f"got {self.head_dim}")
        if self.head_dim is None and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd / n_head ({self.n_embd // self.n_head}) is the head "
                             "width, which must be even (rotary positions rotate pairs); "
                             "change n_head or set head_dim")

    def extend_positions(self, config: Any) -> None:
        """For `init_from`: the loaded config with this section's positions and rope scaling
        (the loaded model's own rope_theta kept; its positions are the learned length)."""
        learned = config.max_position_embeddings
        if self.max_position_embeddings:
            config.max_position_embeddings = self.max_position_embeddings
        if self.rope_scaling is not None:
            theta = (config.rope_parameters or {}).get("rope_theta", self.rope_theta)
            config.rope_parameters = self.rope_scaling.rope_parameters(theta, learned)

    def config_kwargs(self) -> dict[str, Any]:
        """The transformers config arguments these fields set (vocabulary and block apart)."""
        default_mlp = 32 * math.ceil(8 * self.n_embd / 3 / 32)
        return {
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_kv_head or self.n_head,
            "hidden_size": self.n_embd,
            "head_dim": self.head_dim or self.n_embd // self.n_head,
            "intermediate_size": self.intermediate_size or default_mlp,
            "rope_parameters": {"rope_type": "default", "rope_theta": float(self.rope_theta)},
            "rms_norm_eps": self.rms_norm_eps,
            "attention_dropout": self.dropout,
            "tie_word_embeddings": self.tie_embeddings,
        }


@dataclass
class LlamaFields(DecoderFields):
    """The `model:` section of a recipe with `arch: llama` (`LlamaForCausalLM`)."""

    config_class: ClassVar[str] = "LlamaConfig"
    arch: Literal["llama"] = "llama"


@dataclass
class Qwen3Fields(DecoderFields):
    """The `model:` section of a recipe with `arch: qwen3` (`Qwen3ForCausalLM`: Llama's block
    with RMSNorm on each head's queries and keys)."""

    config_class: ClassVar[str] = "Qwen3Config"
    arch: Literal["qwen3"] = "qwen3"
    rms_norm_eps: float = 1e-6
    """Epsilon of the RMSNorm layers (QK-norm included)."""


def build_decoder(
    fields: DecoderFields, tokenizer: PreTrainedTokenizerBase, block_size: int
) -> PreTrainedModel:
    """A freshly initialised model of the transformers config `fields.config_class` names,
    sized for the tokenizer's vocabulary, with `max_position_embeddings` = the recipe's block
    unless the section sets it."""
    import transformers

    kwargs = fields.config_kwargs()
    if fields.rope_scaling is not None:
        kwargs["rope_parameters"] = fields.rope_scaling.rope_parameters(
            float(fields.rope_theta), block_size)
    config = getattr(transformers, fields.config_class)(
        vocab_size=len(tokenizer),
        max_position_embeddings=fields.max_position_embeddings or block_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )
    return transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation=fields.attn_implementation)
