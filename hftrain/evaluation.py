"""Validation: token-weighted NLL over the whole stream -> loss, perplexity, bits per byte.

Every process sums the NLL of its scored tokens, the number of those tokens and the bytes they
spell; the three sums are added across processes before the ratio is taken. Averaging per-batch
or per-process means instead would weight a half-padded batch like a full one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import evaluate
import numpy as np
import torch
import torch.nn.functional as F

from hftrain.data import IGNORE_INDEX, batched
from hftrain.errors import HftrainError

METRIC_PATH = Path(__file__).parent / "metrics" / "perplexity"


@cache
def perplexity_metric() -> evaluate.EvaluationModule:
    """The package's own `evaluate` module, loaded by path (no Hub access needed)."""
    return evaluate.load(str(METRIC_PATH))


def token_byte_lengths(tokenizer: Any) -> torch.Tensor:
    """UTF-8 bytes each token id stands for (0 for special tokens), for bits per byte.

    Byte-level BPE tokens are spelled in GPT-2's byte alphabet, one character per byte;
    other tokenizers' tokens are measured by decoding them.
    """
    special = set(tokenizer.all_special_ids)
    byte_level = "ByteLevel" in str(tokenizer.backend_tokenizer.decoder)
    lengths = []
    for token_id in range(len(tokenizer)):
        if token_id in special:
            lengths.append(0)
        elif byte_level:
            lengths.append(len(tokenizer.convert_ids_to_tokens(token_id)))
        else:
            lengths.append(len(tokenizer.decode([token_id]).encode("utf-8")))
    return torch.tensor(lengths, dtype=torch.long)


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position NLL (0 where the label is ignored), computed in float32.

    Logits that are a (batch, time) transposed view of seq-first storage (the recurrent models
    return such views) are read in storage order, which saves copying them; the positions
    then come out time-major, which no sum cares about.
    """
    if not logits.is_contiguous() and logits.transpose(0, 1).is_contiguous():
        logits, labels = logits.transpose(0, 1), labels.transpose(0, 1)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )


@torch.no_grad()
def evaluate_lm(
    model: Any,
    batches: Iterable[dict[str, torch.Tensor]],
    accelerator: Any,
    byte_lengths: torch.Tensor,
    max_batches: int | None = None,
    stateful: bool = False,
) -> dict[str, float]:
    """Score `batches` with `model`; returns loss, perplexity, bits_per_byte and tokens.

    With `stateful`, the batches are consecutive windows of lanes (`data.lane_windows`) and the
    recurrent state carries from one to the next, so every token is scored with its whole
    lane as context.
    """
    was_training = model.training
    model.eval()
    device = accelerator.device
    byte_lengths = byte_lengths.to(device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nll, tokens, bytes
    state = None
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        input_ids = batch["input_ids"].to(device)
        labels = batch["labels"].to(device)
        if batch.get("reset_state"):
            state = None
        with accelerator.autocast():
            out = model(input_ids=input_ids, past_key_values=state, use_cache=stateful)
        logits, state = out.logits, out.past_key_values if stateful else None
        scored = labels != IGNORE_INDEX
        sums[0] += token_nll(logits, labels).sum(dtype=torch.float64)
        sums[1] += scored.sum()
        sums[2] += byte_lengths[labels[scored]].sum()
    model.train(was_training)
    nll, tokens, n_bytes = accelerator.reduce(sums, reduction="sum").tolist()
    return perplexity_metric().compute(
        nll_sum=[nll], token_count=[int(tokens)], byte_count=[int(n_bytes)]
    )


def text_windows(ids: list[int], block_size: int, stride: int) -> Iterator[np.ndarray]:
    """Sliding windows over one text's tokens that score every target exactly once.

    Window k reads tokens [k * stride, k * stride + block_size] and scores only the targets
    the previous window did not reach, so each target is predicted from up to block_size
    tokens of context, at least block_size - stride of them after the first window. With
    stride = block_size the windows are the packed blocks of in-training evaluation. Yields
    (2, block_size + 1) arrays: token ids, and labels (IGNORE_INDEX where not scored or past
    the end). Needs 1 <= stride <= block_size (`evaluate_texts` checks it).
    """
    tokens = np.asarray(ids, dtype=np.int64)
    last = len(tokens) - 1  # index of the last target; index 0 is never a target
    scored_until = 0
    for begin in range(0, max(last, 1), stride):
        end = min(begin + block_size, last)
        window = np.full((2, block_size + 1), IGNORE_INDEX, dtype=np.int64)
        window[0, : end - begin + 1] = tokens[begin : end + 1]
        first_new = scored_until + 1 - begin  # position in the window of the first new target
        window[1, first_new : end - begin + 1] = tokens[scored_until + 1 : end + 1]
        yield window
        scored_until = end
        if end == last:
            return


def evaluate_texts(model: Any, tokenizer: Any, texts: Iterable[str], accelerator: Any,
                   block_size: int, stride: int | None = None,
                   batch_size: int = 16) -> dict[str, float]:
    """Corpus perplexity and bits per byte of `texts`, each scored on its own (text + EOS) with
    sliding windows (`text_windows`); windows of different texts share padded batches, and
    padding is never scored."""
    stride = stride or block_size
    if not 1 <= stride <= block_size:
        raise HftrainError(f"the stride must be between 1 and the block size ({block_size}), "
                           f"got {stride}")
    backend = tokenizer.backend_tokenizer
    eos = [tokenizer.eos_token_id]

    def windows() -> Iterator[np.ndarray]:
        for text in texts:
            ids = backend.encode(text, add_special_tokens=False).ids + eos
            yield from text_windows(ids, block_size, stride)

    batches = batched(windows(), batch_size, tokenizer.pad_token_id)
    return evaluate_lm(model, batches, accelerator, token_byte_lengths(tokenizer))


def export_block_size(export: str, model: Any) -> int:
    """The block size the export was trained with (its hftrain_recipe.yaml), else the model's
    maximum positions."""
    recipe = Path(export) / "hftrain_recipe.yaml"
    if recipe.is_file():
        import yaml

        return int(yaml.safe_load(recipe.read_text(encoding="utf-8"))["data"]["block_size"])
    positions = getattr(model.config, "n_positions", None)
    if positions is None:
        raise HftrainError(f"cannot tell the block size of '{export}'; pass --block-size")
    return int(positions)
