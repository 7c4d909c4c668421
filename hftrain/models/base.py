"""What every architecture's `model:` section shares: where the weights start, and LoRA.

A fine-tuning recipe names a pretrained model in `init_from`; the architecture fields of the
recipe are then read from that model's config, and `arch` only has to name its family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hftrain.checks import check_local_folder, in_unit_interval, non_negative, positive
from hftrain.errors import HftrainError


@dataclass
class ModelFields:
    arch: str = ""
    """The architecture (each subclass narrows it to its own names)."""
    init_from: str | None = None
    """Start from a pretrained causal LM: an hftrain export folder or a Hub id, loaded with
    `from_pretrained` together with its tokenizer (unless `tokenizer.name_or_path` names
    another). The architecture fields of this section are then taken from it."""
    trust_remote_code: bool = False
    """Allow model or tokenizer code shipped with `init_from` to run. Off unless you say so:
    hftrain's own recurrent models load without it wherever hftrain is installed."""
    lora_r: int = 0
    """Rank of LoRA adapters (PEFT, `pip install hftrain[lora]`); 0 trains every weight.
    Only the adapters train; the export merges them into plain weights."""
    lora_alpha: int = 16
    """LoRA scaling numerator, > 0: updates are scaled by lora_alpha / lora_r."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input, in [0, 1)."""
    lora_target_modules: list[str] | None = None
    """Module names to adapt; unset: PEFT's default for the model type (GPT-2: c_attn;
    Llama, Qwen3: q_proj, v_proj)."""

    def extend_positions(self, config: Any) -> None:
        """For `init_from`: change the loaded config's positions as the section asks (the
        Llama-style decoders may stretch them; other architectures keep theirs)."""

    def __post_init__(self) -> None:
        non_negative(self, "lora_r")
        positive(self, "lora_alpha")
        in_unit_interval(self, "lora_dropout")


def load_pretrained(fields: Any, block_size: int) -> Any:
    """The `init_from` model, checked against the recipe: the family `arch` names (GPT-2's
    model_type, or a recurrent model's cell), and a long enough context."""
    from transformers import AutoConfig, AutoModelForCausalLM

    attention = getattr(fields, "attn_implementation", None)  # recurrent models have none
    check_local_folder(fields.init_from, "model.init_from")
    try:
        config = AutoConfig.from_pretrained(fields.init_from,
                                            trust_remote_code=fields.trust_remote_code)
        fields.extend_positions(config)
        model = AutoModelForCausalLM.from_pretrained(
            fields.init_from, config=config, trust_remote_code=fields.trust_remote_code,
            **({"attn_implementation": attention} if attention else {}),
        )
    except (OSError, ValueError) as exc:
        first_line = str(exc).split("\n")[0]
        raise HftrainError(f"cannot load model.init_from '{fields.init_from}': {first_line}") \
            from None
    loaded = getattr(model.config, "cell", None) or model.config.model_type
    if loaded != fields.arch:
        raise HftrainError(
            f"model.arch is '{fields.arch}' but model.init_from '{fields.init_from}' holds a "
            f"'{loaded}' model; set model.arch to match it"
        )
    positions = position_limit(model)
    if positions is not None and block_size > positions:
        raise HftrainError(
            f"data.block_size {block_size} is longer than the {positions} positions of "
            f"model.init_from '{fields.init_from}'"
        )
    return model


def position_limit(model: Any) -> int | None:
    """How many positions `model` can attend to: its config's `max_position_embeddings` (GPT-2's
    `n_positions` answers to that name too); None for models without a limit (recurrent)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    return None if positions is None else int(positions)


def add_lora(model: Any, fields: ModelFields) -> Any:
    """Wrap `model` with PEFT LoRA adapters; only they stay trainable."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise HftrainError("model.lora_r needs PEFT: pip install 'hftrain[lora]'") from None
    _check_targets_untied(model, fields.lora_target_modules or [])
    config = LoraConfig(
        r=fields.lora_r,
        lora_alpha=fields.lora_alpha,
        lora_dropout=fields.lora_dropout,
        target_modules=fields.lora_target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise HftrainError(f"model.lora_target_modules: {exc}".split("\n")[0]) from None


def _check_targets_untied(model: Any, targets: list[str]) -> None:
    """Refuse an adapter on an embedding that is tied to the output head: in training it
    changes only the module it wraps, but merging folds it into the one shared matrix, so the
    export would change the other end too and would not be the model that was trained."""
    if not targets:  # PEFT's defaults are attention projections
        return
    try:
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):  # a remote-code model without them
        return
    if head is None or getattr(head, "weight", None) is not getattr(embedding, "weight", 0):
        return
    tied = [name for name, module in model.named_modules() if module in (embedding, head)]
    for target in targets:
        if any(name == target or name.endswith(f".{target}") for name in tied):
            raise HftrainError(
                f"model.lora_target_modules: '{target}' shares its weight with this model's "
                "tied input embedding and output head; an adapter there trains one end of the "
                "tie, and the merged export would change both: adapt other modules, or train "
                "a model with tie_embeddings: false")


def is_lora(model: Any) -> bool:
    """Whether `model` is a PEFT model with adapters to merge before export."""
    return hasattr(model, "merge_and_unload")
