"""Validation: token-weighted NLL over the whole stream -> loss, perplexity, bits per byte.

Every process sums the NLL of its scored tokens, the number of those tokens and the bytes of
text they stand for (`hftrain.framing`); the three sums are added across processes before the
ratio is taken. Averaging per-batch
or per-process means instead would weight a half-padded batch like a full one.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from hftrain.data import IGNORE_INDEX, batched
from hftrain.errors import HftrainError, one_line
from hftrain.framing import Framing, token_bytes
from hftrain.models.base import position_limit
from hftrain.models.recurrent.modeling_recurrent import recurrent_cache

if TYPE_CHECKING:
    import evaluate

METRIC_PATH = Path(__file__).parent / "metrics" / "perplexity"


@cache
def perplexity_metric() -> evaluate.EvaluationModule:
    """The package's own `evaluate` module, loaded by path (no Hub access needed). `evaluate`
    is imported here, when a score is first computed: its import pulls transformers'
    pipelines and scipy.stats (~0.5-1 s), which a command that scores nothing never pays."""
    import evaluate

    return evaluate.load(str(METRIC_PATH))


def model_inputs(batch: dict[str, Any], device: Any) -> dict[str, torch.Tensor]:
    """The model's inputs from a batch: token ids, and the position ids of packed fine-tuning
    examples (from which transformers keeps each example's attention to itself)."""
    inputs = {"input_ids": batch["input_ids"].to(device, non_blocking=True)}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"].to(device, non_blocking=True)
    return inputs


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
    max_batches: int | None = None,
    stateful: bool = False,
    lockstep: bool = False,
) -> dict[str, float]:
    """Score `batches` with `model`; returns loss, perplexity, bits_per_byte, nll, tokens and
    bytes.

    Each batch carries `byte_counts`, the UTF-8 bytes of text each target stands for
    (`hftrain.framing.token_bytes`), summed over the scored targets for bits per byte. With
    `stateful`, the batches are consecutive windows of lanes (`data.lane_windows`) and the
    recurrent state carries from one to the next, so every token is scored with its whole
    lane as context. With `lockstep` (a sharded model, whose every forward needs every
    process) the processes take their forwards together (`in_lockstep`).
    """
    was_training = model.training
    model.eval()
    device = accelerator.device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nll, tokens, bytes
    state = None
    batches = itertools.islice(batches, max_batches)
    for batch in in_lockstep(batches, accelerator) if lockstep else batches:
        labels = batch["labels"].to(device)
        if batch.get("reset_state"):
            state = None
        with accelerator.autocast():
            carried = {"cache": state, "use_cache": True} if stateful else {"use_cache": False}
            out = model(**model_inputs(batch, device), **carried)
        logits, state = out.logits, recurrent_cache(out) if stateful else None
        scored = labels != IGNORE_INDEX
        sums[0] += token_nll(logits, labels).sum(dtype=torch.float64)
        sums[1] += scored.sum()
        sums[2] += batch["byte_counts"].to(device)[scored].sum()
    model.train(was_training)
    nll, tokens, n_bytes = accelerator.reduce(sums, reduction="sum").tolist()
    return perplexity_metric().compute(
        nll_sum=[nll], token_count=[int(tokens)], byte_count=[int(n_bytes)]
    )


def in_lockstep(batches: Iterable[dict[str, torch.Tensor]],
                accelerator: Any) -> Iterator[dict[str, torch.Tensor]]:
    """The batches, then empty ones until every process has run out: the processes may hold
    unequal numbers of validation batches (a one-piece file gives all of it to one rank),
    and a sharded forward waits for every rank. An empty batch is one token that scores
    nothing (its label is ignored) and resets any recurrent state. The processes agree on
    "any left?" before each forward: one small all-reduce beside the forward's all-gathers."""
    empty = {"input_ids": torch.zeros(1, 1, dtype=torch.long),
             "labels": torch.full((1, 1), IGNORE_INDEX, dtype=torch.long),
             "byte_counts": torch.zeros(1, 1, dtype=torch.long), "reset_state": True}
    batches = iter(batches)
    while True:
        batch = next(batches, None)
        left = torch.tensor(float(batch is not None), device=accelerator.device)
        if accelerator.reduce(left, reduction="max").item() == 0:
            return
        yield empty if batch is None else batch


def text_windows(tokens: np.ndarray, block_size: int, stride: int) -> Iterator[np.ndarray]:
    """Sliding windows over one text's tokens that score every target exactly once.

    `tokens` is (2, n): token ids, and the bytes each stands for. Window k reads tokens
    [k * stride, k * stride + block_size] and scores only the targets the previous window did
    not reach, so each target is predicted from up to block_size tokens of context, at least
    block_size - stride of them after the first window. With stride = block_size the windows
    are the packed blocks of in-training evaluation. Yields (3, block_size + 1) arrays: ids,
    labels (IGNORE_INDEX where not scored or past the end) and bytes (`packing.collate` rows
    "ids", "labels", "bytes"). Needs 1 <= stride <= block_size (`evaluate_texts` checks it).
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    last = tokens.shape[1] - 1  # index of the last target; index 0 is never a target
    scored_until = 0
    for begin in range(0, max(last, 1), stride):
        end = min(begin + block_size, last)
        window = np.full((3, block_size + 1), IGNORE_INDEX, dtype=np.int64)
        window[[0, 2], : end - begin + 1] = tokens[:, begin : end + 1]
        first_new = scored_until + 1 - begin  # position in the window of the first new target
        window[1, first_new : end - begin + 1] = tokens[0, scored_until + 1 : end + 1]
        yield window
        scored_until = end
        if end == last:
            return


def evaluate_texts(model: Any, tokenizer: Any, texts: Iterable[str], accelerator: Any,
                   block_size: int, stride: int | None = None,
                   batch_size: int = 16) -> dict[str, float]:
    """Corpus perplexity and bits per byte of `texts`, each scored on its own as a document
    (start token, text, EOS: `hftrain.framing`; the first text token is scored after the start
    token, as lm-eval scores it after its BOS prefix) with sliding windows (`text_windows`);
    windows of different texts share padded batches, and padding is never scored."""
    stride = stride or block_size
    if not 1 <= stride <= block_size:
        raise HftrainError(f"the stride must be between 1 and the block size ({block_size}), "
                           f"got {stride}")
    backend = tokenizer.backend_tokenizer
    framing = Framing.of(tokenizer)

    def windows() -> Iterator[np.ndarray]:
        for text in texts:
            encoding = backend.encode(text, add_special_tokens=False)
            ids = framing.opening + framing.document(encoding.ids)  # a stream of one document
            counts = np.concatenate([np.zeros(len(framing.opening), np.int64),
                                     token_bytes(framing, text, encoding)])
            yield from text_windows(np.stack([ids, counts]), block_size, stride)

    rows = ("ids", "labels", "bytes")
    batches = batched(windows(), batch_size, tokenizer.pad_token_id, rows)
    return evaluate_lm(model, batches, accelerator)


def recorded_block_size(export: str) -> int | None:
    """The block size an hftrain export was trained with (its hftrain_recipe.yaml), or None
    (another model, or a Hub id)."""
    recipe = Path(export) / "hftrain_recipe.yaml"
    if not recipe.is_file():
        return None
    import yaml

    from hftrain.yaml_data import load_yaml

    try:
        return int(load_yaml(recipe.read_text(encoding="utf-8"))["data"]["block_size"])
    except (OSError, UnicodeDecodeError, yaml.YAMLError, TypeError, KeyError,
            ValueError) as exc:
        raise HftrainError(f"{recipe}: no usable data.block_size ({one_line(exc)}); give "
                           "--block-size") from None


def scoring_block_size(export: str, model: Any, asked: int | None) -> int:
    """The window `hftrain eval --data` scores with: `asked` (--block-size), else the
    export's block size; no more than the model's positions."""
    block_size = asked or export_block_size(export, model)
    positions = position_limit(model)
    if positions is not None and block_size > positions:
        raise HftrainError(f"--block-size {block_size} is more than the {positions} positions "
                           f"of the model in {export} (config max_position_embeddings)")
    return block_size


def export_block_size(export: str, model: Any) -> int:
    """The block size the export was trained with, else the model's maximum positions."""
    recorded = recorded_block_size(export)
    if recorded is not None:
        return recorded
    positions = position_limit(model)
    if positions is None:
        raise HftrainError(f"cannot tell the block size of '{export}'; pass --block-size")
    return positions
