"""Text generation through `model.generate`, with a sliding window for fixed-context models."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from hftrain.errors import HftrainError
from hftrain.framing import Framing
from hftrain.models.base import position_limit
from hftrain.tokenizer import load_tokenizer


def check_export_exists(path: str) -> None:
    """A path that names a folder (not a Hub id like `user/name`) must exist: one line, not a
    Hub lookup that fails offline."""
    looks_local = Path(path).is_absolute() or path.startswith(".") or path.count("/") > 1
    if looks_local and not Path(path).exists():
        raise HftrainError(f"export folder not found: {path}")


def load_export(path: str, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """Model and tokenizer from an export folder (or Hub id), ready for generation."""
    check_export_exists(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code)
    # UnpicklingError: a pickled pytorch_model.bin that torch.load(weights_only) refused (its
    # payload ran nothing): a bad export, not a crash
    except (OSError, ValueError, pickle.UnpicklingError) as exc:
        raise HftrainError(f"cannot load model '{path}': {exc}".split("\n")[0]) from None
    return model.eval(), load_tokenizer(path, trust_remote_code=trust_remote_code)


@torch.no_grad()
def generate_text(
    model: Any,
    tokenizer: Any,
    prompt: str = "",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 200,
    top_p: float | None = None,
) -> str:
    """Continue `prompt` as the start of a document: after the start token, as every document
    is read in training (`hftrain.framing`), so an empty prompt samples a new document.

    A model with a fixed number of positions (GPT-2) cannot see more than that many tokens:
    when the text fills the window, generation restarts from its last half, as nanoGPT crops
    its context. Stops early at EOS.
    """
    device = next(model.parameters()).device
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    ids = torch.tensor([[Framing.of(tokenizer).start, *prompt_ids]], device=device)
    n_prompt = ids.size(1)
    window = position_limit(model)
    sampling = {"do_sample": temperature > 0}
    if temperature > 0:
        sampling.update(temperature=temperature, top_k=top_k, top_p=top_p)
    while ids.size(1) - n_prompt < max_new_tokens:
        context = ids if window is None or ids.size(1) < window else ids[:, -(window // 2):]
        room = max_new_tokens - (ids.size(1) - n_prompt)
        if window is not None:
            room = min(room, window - context.size(1))
        out = model.generate(
            context,
            attention_mask=torch.ones_like(context),
            max_new_tokens=room,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            synced_gpus=False,  # one process, a whole model (a sharded run samples its gathered
            **sampling,         # copy on rank 0 only, where transformers' ZeRO-3 check would wait)
        )
        new = out[:, context.size(1):]
        ids = torch.cat([ids, new], dim=1)
        if (new == tokenizer.eos_token_id).any():
            break
    new_ids = ids[0, n_prompt:].tolist()
    if tokenizer.eos_token_id in new_ids:
        new_ids = new_ids[: new_ids.index(tokenizer.eos_token_id)]
    # Decode prompt and continuation together: a word-level decoder puts the space between.
    # Special tokens are dropped, but not <|unk|>: an unknown prompt word stays visible.
    special = Framing.of(tokenizer).special
    return tokenizer.decode([i for i in prompt_ids + new_ids if i not in special])
