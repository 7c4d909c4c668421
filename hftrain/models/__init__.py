"""Model registry: a plain dict from the recipe's `model.arch` to its fields and builder.

A new architecture adds one entry: a dataclass describing its recipe fields (checked like every
other recipe section, based on `ModelFields`) and a function that turns those fields, the
tokenizer and the block size into a `PreTrainedModel`. Starting from a pretrained model
(`init_from`) and LoRA work the same for every entry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from hftrain.errors import HftrainError
from hftrain.models.base import add_lora, load_pretrained
from hftrain.models.gpt2 import GPT2Fields, build_gpt2
from hftrain.models.llama import LlamaFields, Qwen3Fields, build_decoder
from hftrain.models.rnn import RecurrentFields, build_recurrent


class ModelSpec(NamedTuple):
    fields: type
    build: Callable[..., Any]


MODELS: dict[str, ModelSpec] = {
    "gpt2": ModelSpec(GPT2Fields, build_gpt2),
    "llama": ModelSpec(LlamaFields, build_decoder),
    "qwen3": ModelSpec(Qwen3Fields, build_decoder),
    "lstm": ModelSpec(RecurrentFields, build_recurrent),
    "gru": ModelSpec(RecurrentFields, build_recurrent),
    "rnn_tanh": ModelSpec(RecurrentFields, build_recurrent),
    "rnn_relu": ModelSpec(RecurrentFields, build_recurrent),
}


def build_model(fields: Any, tokenizer: Any, block_size: int,
                checkpoint_activations: bool = False) -> Any:
    """The model a recipe's `model:` section describes: freshly initialised, or loaded from
    `init_from` (the family `arch` names must match), with LoRA adapters if asked for, and
    activation checkpointing (`train.gradient_checkpointing`)."""
    if fields.init_from:
        model = load_pretrained(fields, block_size)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
    else:
        model = MODELS[fields.arch].build(fields, tokenizer, block_size)
    if checkpoint_activations:
        # transformers checkpoints each decoder layer's `forward` (its hooks, FSDP2's, stay
        # outside). Non-reentrant: torch's recommended form, which needs no input that
        # requires grad (LoRA over frozen embeddings works as is) and composes with FSDP2 and
        # torch.compile. The RNG state is replayed in the recompute, so dropout masks, and
        # therefore the losses, are those of a run without it.
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    return add_lora(model, fields) if fields.lora_r else model


def check_attention_available(fields: Any) -> None:
    """transformers reports a missing flash-attn package with a long ImportError; say it in
    one line. `train` asks before Accelerate starts any process group."""
    if getattr(fields, "attn_implementation", None) != "flash_attention_2":
        return
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        raise HftrainError("model.attn_implementation flash_attention_2 needs the flash-attn "
                           "package and a CUDA GPU (pip install flash-attn); sdpa needs "
                           "neither")


def check_attention_precision(fields: Any, precision: str) -> None:
    """flash_attention_2 computes in bf16 or fp16 only: with fp32 weights and no autocast the
    first forward fails deep in flash-attn. `precision` is the mixed precision that runs."""
    if getattr(fields, "attn_implementation", None) == "flash_attention_2" \
            and precision not in ("bf16", "fp16"):
        raise HftrainError("model.attn_implementation flash_attention_2 runs in bf16 or fp16 "
                           f"only, and this run's mixed precision is '{precision}': launch "
                           "with bf16 (train.mixed_precision=bf16), or use sdpa")
