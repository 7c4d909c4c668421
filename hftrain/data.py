"""Streaming data: `datasets` stream -> tokenize -> join with EOS -> pack into blocks -> batches.

The stream is never materialised: documents flow from `load_dataset(..., streaming=True)`
through a batched tokenizing `map`, and are cut into fixed-length blocks as they arrive.
Each block holds `block_size + 1` tokens and overlaps the next by one, so inputs are
`block[:-1]` and targets `block[1:]`: every token after the first is a target exactly once.

A row that cannot be read or used (not UTF-8, malformed JSON, a null text) stops the stream
with a DataError naming its file and line, and so does a data file that changes while a run
reads it (`hftrain.data_check`).
"""

from __future__ import annotations

import glob
import itertools
import random
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node

from hftrain.data_check import Source, check_unchanged, explain, fingerprint
from hftrain.errors import DataError, RecordError
from hftrain.recipe import DataConfig
from hftrain.sft import IGNORE_INDEX, SFT_COLUMNS, encode_record, record_problem, value_kind

__all__ = ["IGNORE_INDEX", "DataStreams", "pack_blocks", "pack_arrays", "collate"]

_FORMAT_BY_SUFFIX = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json",
                     ".parquet": "parquet"}


def resolve_files(patterns: list[str], key: str) -> list[str]:
    """Expand globs and check every file exists; the error names the missing path."""
    files: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise DataError(f"no file matches {key} pattern '{pattern}'")
            files.extend(matches)
        elif not Path(pattern).is_file():
            raise DataError(f"data file not found: {pattern} (from {key})")
        else:
            files.append(pattern)
    return files


def _file_format(files: list[str], configured: str) -> str:
    if configured != "auto":
        return configured
    suffixes = {Path(f).suffix.lower() for f in files}
    formats = {_FORMAT_BY_SUFFIX.get(s) for s in suffixes}
    if len(formats) != 1 or None in formats:
        raise DataError(
            f"cannot tell the format of {files} from their extensions; set data.format"
        )
    return formats.pop()


def _load_files(files: list[str], config: DataConfig) -> IterableDataset:
    fmt = _file_format(files, config.format)
    kwargs: dict[str, Any] = {"sample_by": config.sample_by} if fmt == "text" else {}
    try:  # a Parquet file's schema is read here (a file that is not Parquet fails now)
        ds = load_dataset(fmt, data_files=files, split="train", streaming=True, **kwargs)
    except Exception as exc:
        error = explain(exc, _files_source(files, config))
        if error is None:
            raise
        raise error from exc
    return _columns(ds, config, ", ".join(files))


def _files_source(files: list[str], config: DataConfig) -> Source:
    return Source(", ".join(files), tuple(files), _file_format(files, config.format),
                  config.kind, config.text_column)


def _columns(ds: IterableDataset, config: DataConfig, source: str) -> IterableDataset:
    """Keep what the recipe trains on: the text column, or the fine-tuning record fields."""
    if config.kind == "text":
        return _text_only(ds, config.text_column, source)
    present = [c for c in SFT_COLUMNS if ds.column_names is None or c in ds.column_names]
    if ds.column_names is not None and not (
        "messages" in present or {"prompt", "completion"} <= set(present)
    ):
        raise DataError(f"{source} has neither 'messages' nor 'prompt' and 'completion' "
                        f"columns (columns: {ds.column_names}), which data.kind: sft reads")
    return ds.select_columns(present) if ds.column_names is not None else ds


def _text_only(ds: IterableDataset, column: str, source: str) -> IterableDataset:
    if ds.column_names is not None and column not in ds.column_names:
        raise DataError(f"{source} has no column '{column}' (columns: {ds.column_names}); "
                        "set data.text_column")
    ds = ds.select_columns([column])
    return ds.rename_column(column, "text") if column != "text" else ds


def _hold_out(ds: IterableDataset, fraction: float, keep: str) -> IterableDataset:
    """Split every document at 1 - fraction of its characters: `head` trains, `tail` validates."""

    def cut(example: dict[str, str]) -> dict[str, str]:
        text = _checked_text(example["text"])
        at = int(len(text) * (1.0 - fraction))
        return {"text": text[:at] if keep == "head" else text[at:]}

    return ds.map(cut)


_SOURCES: weakref.WeakKeyDictionary[IterableDataset, Source] = weakref.WeakKeyDictionary()
"""Where each stream `text_stream` returned reads from, so that `texts` can name the file and
line of a row it cannot read."""


def text_stream(config: DataConfig, split: str) -> IterableDataset:
    """The documents of `split` ("train" or "val") as a stream of {"text": str} rows."""
    ds = _text_stream(config, split)
    _SOURCES[ds] = stream_source(config, split)
    return ds


def stream_source(config: DataConfig, split: str) -> Source:
    """Where `split` reads from: the files (as `text_stream` reads them) or the Hub dataset."""
    if config.dataset:
        return Source(f"dataset {config.dataset}", (), "", config.kind, config.text_column)
    if split == "val" and config.val_files:
        return _files_source(resolve_files(config.val_files, "data.val_files"), config)
    return _files_source(resolve_files(config.train_files, "data.train_files"), config)


def _text_stream(config: DataConfig, split: str) -> IterableDataset:
    if config.dataset:
        held_out = config.val_split is None
        hub_split = config.val_split if split == "val" and not held_out else config.train_split
        ds = load_dataset(config.dataset, config.dataset_config, split=hub_split, streaming=True)
        ds = _columns(ds, config, f"dataset {config.dataset}")
    else:
        if not config.train_files:
            raise DataError("the recipe names no training data: set data.train_files")
        held_out = not config.val_files
        if split == "val" and not held_out:
            return _load_files(resolve_files(config.val_files, "data.val_files"), config)
        ds = _load_files(resolve_files(config.train_files, "data.train_files"), config)
    if not held_out:
        return ds
    if config.val_fraction == 0:
        if split == "val":
            raise DataError("no validation data: set data.val_files or data.val_fraction > 0")
        return ds
    keep = "tail" if split == "val" else "head"
    if config.kind == "sft":
        return _hold_out_records(ds, config.val_fraction, keep)
    return _hold_out(ds, config.val_fraction, keep)


def _hold_out_records(ds: IterableDataset, fraction: float, keep: str) -> IterableDataset:
    """Fine-tuning records are not cut in two: record i validates when (i + 1) * fraction
    reaches a new integer, which spreads exactly `fraction` of them evenly over the stream."""

    def is_val(_: dict, index: int) -> bool:
        return int((index + 1) * fraction) > int(index * fraction)

    return ds.filter(lambda row, i: is_val(row, i) == (keep == "tail"), with_indices=True)


def describe_source(config: DataConfig, split: str) -> str:
    """Where a split comes from, for messages."""
    if config.dataset:
        return f"dataset {config.dataset}"
    files = config.val_files if split == "val" and config.val_files else config.train_files
    return ", ".join(files)


def texts(ds: IterableDataset) -> Iterator[str]:
    """The text of every row: a document, or a fine-tuning record's prompt, completion and
    message contents (what a tokenizer built for fine-tuning data learns from). A row that
    cannot be read or used stops it with a DataError naming the file and line."""
    return guarded(_row_texts(ds), _SOURCES.get(ds))


def _row_texts(ds: IterableDataset) -> Iterator[str]:
    for row in ds:
        if "text" in row:
            yield _checked_text(row["text"])
        else:
            problem = record_problem(row)
            if problem:
                raise RecordError(f"a fine-tuning record is malformed: {problem}")
            parts = [row.get("prompt"), row.get("completion")]
            parts += [m.get("content") for m in row.get("messages") or []]
            yield "\n".join(p for p in parts if isinstance(p, str))


def _checked_text(text: Any) -> str:
    """A row's text, which must be a string: a null (or a number) stops the stream at once."""
    if not isinstance(text, str):
        raise RecordError(f"a row's text is {value_kind(text)}, not a string")
    return text


def guarded(rows: Iterable[Any], source: Source | None) -> Iterator[Any]:
    """`rows`, except that an error reading them (a byte that is not UTF-8, a malformed JSON
    line, a null text, a file deleted mid-stream) becomes a DataError naming the file and line
    (`data_check.explain`). Errors that do not come from the data keep their traceback."""
    try:
        yield from rows
    except Exception as exc:
        if isinstance(exc, DataError) and not isinstance(exc, RecordError):
            raise  # already says what is wrong where (a missing file, an empty corpus)
        error = explain(exc, source)
        if error is None:
            raise
        raise error from exc


def tokenize(ds: IterableDataset, tokenizer: Any) -> IterableDataset:
    """Batched tokenization in the fast (Rust) backend, without special tokens.

    `encode_batch_fast` skips the character offsets nothing here reads: 4x faster on a
    1 MB document.
    """
    backend = tokenizer.backend_tokenizer

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        batch_texts = [_checked_text(text) for text in batch["text"]]
        encodings = backend.encode_batch_fast(batch_texts, add_special_tokens=False)
        return {"input_ids": [e.ids for e in encodings]}

    return ds.map(encode, batched=True, batch_size=256, remove_columns=["text"])


def encode_records(ds: IterableDataset, tokenizer: Any) -> IterableDataset:
    """Fine-tuning records -> `input_ids` and `labels` (IGNORE_INDEX where not scored)."""

    def encode(record: dict[str, Any]) -> dict[str, list[int]]:
        ids, labels = encode_record(record, tokenizer)
        return {"input_ids": ids.tolist(), "labels": labels.tolist()}

    return ds.map(encode, remove_columns=[c for c in SFT_COLUMNS if c in (ds.column_names or ())])


def pack_blocks(
    documents: Iterable[list[int]], block_size: int, eos_id: int, pad_tail: bool = False
) -> Iterator[np.ndarray]:
    """Join documents with EOS and cut the token stream into blocks of `block_size + 1`.

    Consecutive blocks share one token (the last target of a block is the first input of the
    next). With `pad_tail`, the final partial block is padded with IGNORE_INDEX so that every
    token is scored (evaluation); without, the tail waits for more documents (training, where
    the stream repeats).
    """
    arrays = (np.append(np.asarray(ids, dtype=np.int64), eos_id) for ids in documents)
    return pack_arrays(arrays, block_size, pad_tail)


def pack_arrays(
    arrays: Iterable[np.ndarray], block_size: int, pad_tail: bool = False
) -> Iterator[np.ndarray]:
    """`pack_blocks` for arrays whose last axis is tokens: 1-D ids, or (2, n) ids and labels
    (fine-tuning examples, which end with their own EOS)."""
    width = block_size + 1
    buffer: np.ndarray | None = None
    for array in arrays:
        buffer = array if buffer is None else np.concatenate([buffer, array], axis=-1)
        n_blocks = (buffer.shape[-1] - 1) // block_size
        for i in range(n_blocks):
            yield buffer[..., i * block_size : i * block_size + width]
        buffer = buffer[..., n_blocks * block_size :]
    if pad_tail and buffer is not None and buffer.shape[-1] > 1:
        tail = np.full((*buffer.shape[:-1], width), IGNORE_INDEX, dtype=np.int64)
        tail[..., : buffer.shape[-1]] = buffer
        yield tail


def pad_examples(examples: Iterable[np.ndarray], block_size: int) -> Iterator[np.ndarray]:
    """One (2, block_size + 1) block per fine-tuning example, cut to length or padded with
    IGNORE_INDEX (the unpacked alternative to `pack_arrays`)."""
    width = block_size + 1
    for example in examples:
        example = example[:, :width]
        block = np.full((2, width), IGNORE_INDEX, dtype=np.int64)
        block[:, : example.shape[1]] = example
        yield block


def shuffle_blocks(blocks: Iterable[np.ndarray], buffer_size: int, seed: int) -> Iterator[Any]:
    """A seeded shuffle buffer: hold `buffer_size` blocks, emit a random one as each arrives."""
    if buffer_size <= 1:
        yield from blocks
        return
    rng = random.Random(seed)
    buffer: list[np.ndarray] = []
    for block in blocks:
        if len(buffer) < buffer_size:
            buffer.append(block)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = block
    rng.shuffle(buffer)
    yield from buffer


def lane_windows(
    tokens: np.ndarray, n_lanes: int, window: int, pad_tail: bool = False
) -> Iterator[list[np.ndarray]]:
    """Lay a token stream out in `n_lanes` contiguous lanes and cut them into windows.

    Lane j holds tokens [j*L, (j+1)*L] and overlaps the next lane by one token, so every token
    after the first is a target exactly once. Window i is columns [i*window, (i+1)*window] of
    every lane: row j of consecutive windows continues lane j, which is what lets a recurrent
    state carry from one window to the next (truncated BPTT). Without `pad_tail` the last
    (len - 1) mod n_lanes tokens are dropped, as the classic `batchify` does; with it the last
    lane is padded with IGNORE_INDEX so that every token is scored. The last window of an
    epoch is padded to full width, keeping shapes fixed.
    """
    n_targets = len(tokens) - 1
    lane_len = -(-n_targets // n_lanes) if pad_tail else n_targets // n_lanes
    if pad_tail:
        padding = np.full(lane_len * n_lanes - n_targets, IGNORE_INDEX, dtype=np.int64)
        tokens = np.concatenate([tokens, padding])
    lanes = np.stack([tokens[j * lane_len : (j + 1) * lane_len + 1] for j in range(n_lanes)])
    for start in range(0, lane_len, window):
        chunk = lanes[:, start : start + window + 1]  # (n_lanes, <= window + 1)
        missing = window + 1 - chunk.shape[1]
        if missing:
            chunk = np.pad(chunk, ((0, 0), (0, missing)), constant_values=IGNORE_INDEX)
        yield list(chunk)


def collate(blocks: list[np.ndarray], batch_size: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Stack blocks into fixed-shape `input_ids` and `labels`; missing rows are all padding.

    A block is 1-D token ids (every next token is a target) or (2, width) ids and labels.
    """
    stacked = np.stack(blocks)
    if stacked.ndim == 2:
        stacked = np.stack([stacked, stacked], axis=1)
    rows = np.full((batch_size, *stacked.shape[1:]), IGNORE_INDEX, dtype=np.int64)
    rows[: len(blocks)] = stacked
    inputs = torch.from_numpy(rows[:, 0, :-1].copy())
    inputs[inputs == IGNORE_INDEX] = pad_id
    return {"input_ids": inputs, "labels": torch.from_numpy(rows[:, 1, 1:].copy())}


def batched(blocks: Iterable[np.ndarray], batch_size: int, pad_id: int) -> Iterator[dict]:
    pending: list[np.ndarray] = []
    for block in blocks:
        pending.append(block)
        if len(pending) == batch_size:
            yield collate(pending, batch_size, pad_id)
            pending = []
    if pending:
        yield collate(pending, batch_size, pad_id)


def _documents(ds: IterableDataset) -> Iterator[Any]:
    """Token ids of each text document, or (2, n) ids and labels of each fine-tuning example."""
    for row in ds:
        if "labels" in row:
            yield np.array([row["input_ids"], row["labels"]], dtype=np.int64)
        else:
            yield row["input_ids"]


class DataStreams:
    """The recipe's training and validation streams, tokenized and packed.

    `train_batches()` is endless: the source repeats epoch after epoch (reshuffled by epoch)
    and packing runs on across epoch boundaries. `val_batches()` reads the validation split
    once, in order, padding the tail so that every token is scored. With `stateful`, both lay
    their stream out in lanes (`lane_windows`) instead of shuffled blocks, and the first batch
    of every pass carries `reset_state=True`.

    With several processes, each rank sees a disjoint part of every stream. A source whose
    shards divide among the ranks is split by shard (`split_dataset_by_node`: each rank reads
    only its files). Otherwise, as `datasets` itself does when shards do not divide, every rank
    reads the whole (seeded, identical) stream and keeps its share: block i goes to rank
    i mod world_size, and of `world_size x batch_size` lanes rank r keeps its `batch_size`.
    Then N processes with batch B/N train on exactly the batches one process with batch B
    would.
    """

    def __init__(self, config: DataConfig, tokenizer: Any, seed: int, stateful: bool = False,
                 rank: int = 0, world_size: int = 1) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.seed = seed
        self.stateful = stateful
        self.rank = rank
        self.world_size = world_size
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        self.sources: dict[str, Source] = {}
        self.fingerprints: dict[str, tuple[int, int]] = {}
        """(size, mtime_ns) of every local file read, taken when its stream is first built."""

    def _source(self, split: str) -> tuple[IterableDataset, bool]:
        """The split's documents for this rank, and whether they were split by shard."""
        ds = text_stream(self.config, split)
        self.sources[split] = source = _SOURCES.get(ds) or stream_source(self.config, split)
        for path in source.files:
            if path not in self.fingerprints:
                self.fingerprints[path] = fingerprint(path)
        by_shard = self.world_size > 1 and ds.n_shards % self.world_size == 0
        if by_shard:
            ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)
        return ds, by_shard

    def _encode(self, ds: IterableDataset) -> IterableDataset:
        if self.config.kind == "sft":
            return encode_records(ds, self.tokenizer)
        return tokenize(ds, self.tokenizer)

    def train_epochs(self, ds: IterableDataset) -> Iterator[Iterator[Any]]:
        """One document iterator per epoch, forever; each epoch checks the corpus is usable."""
        if self.config.shuffle_buffer > 0 and not self.stateful:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.config.shuffle_buffer)
        ds = self._encode(ds)
        for epoch in itertools.count():
            ds.set_epoch(epoch)
            yield self._checked_epoch(ds)

    def _checked_epoch(self, ds: IterableDataset) -> Iterator[Any]:
        n_documents = n_tokens = 0
        for row in guarded(_documents(ds), self.sources.get("train")):
            n_documents += 1
            n_tokens += row.shape[-1] if isinstance(row, np.ndarray) else len(row)
            yield row
        check_unchanged(self.fingerprints)  # a file cut short mid-epoch ends it early
        self._check_length(n_tokens, n_documents)

    def _blocks(self, documents: Iterable[Any], pad_tail: bool) -> Iterator[np.ndarray]:
        """Text documents packed with EOS; fine-tuning examples packed or padded one by one."""
        if self.config.kind == "text":
            return pack_blocks(documents, self.config.block_size, self.eos_id, pad_tail)
        if self.config.packing:
            return pack_arrays(documents, self.config.block_size, pad_tail)
        return pad_examples(documents, self.config.block_size)

    def train_batches(self, batch_size: int) -> Iterator[dict[str, Any]]:
        ds, by_shard = self._source("train")
        if self.stateful:
            return self._lane_batches(self.train_epochs(ds), batch_size, False, by_shard)
        documents = itertools.chain.from_iterable(self.train_epochs(ds))
        blocks = self._blocks(documents, pad_tail=False)
        blocks = shuffle_blocks(blocks, self.config.shuffle_buffer, self.seed)
        return batched(self._my_blocks(blocks, by_shard), batch_size, self.pad_id)

    def val_batches(self, batch_size: int) -> Iterator[dict[str, Any]]:
        check_unchanged(self.fingerprints)  # every file read so far, training files included
        ds, by_shard = self._source("val")
        documents = guarded(_documents(self._encode(ds)), self.sources["val"])
        if self.stateful:
            return self._lane_batches([documents], batch_size, True, by_shard)
        blocks = self._blocks(documents, pad_tail=True)
        return batched(self._my_blocks(blocks, by_shard), batch_size, self.pad_id)

    def _my_blocks(self, blocks: Iterable[np.ndarray], by_shard: bool) -> Iterable[np.ndarray]:
        if self.world_size == 1 or by_shard:
            return blocks
        return itertools.islice(blocks, self.rank, None, self.world_size)

    def _lane_batches(self, epochs: Iterable[Iterable[list[int]]], batch_size: int,
                      pad_tail: bool, by_shard: bool) -> Iterator[dict[str, Any]]:
        """Each pass over the documents is held as one token array and cut into lanes; without
        shard splitting, the lanes of all ranks are laid out together and each keeps its own."""
        lanes = batch_size * (1 if by_shard else self.world_size)
        first = 0 if by_shard else self.rank * batch_size
        for documents in epochs:
            pieces = [np.asarray([*ids, self.eos_id], dtype=np.int64) for ids in documents]
            tokens = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)
            if len(tokens) <= lanes and not pad_tail:
                raise DataError(
                    f"the training corpus ({describe_source(self.config, 'train')}) has "
                    f"{len(tokens)} tokens, too few for {lanes} lanes of at least one token"
                )
            if len(tokens) < 2:
                return
            windows = lane_windows(tokens, lanes, self.config.block_size, pad_tail)
            for i, rows in enumerate(windows):
                batch = collate(rows[first : first + batch_size], batch_size, self.pad_id)
                batch["reset_state"] = i == 0
                yield batch

    def check_val(self, batch_size: int) -> None:
        """Pull one validation batch, so empty validation data fails before anything is written."""
        if next(self.val_batches(batch_size), None) is None:
            raise DataError(f"the validation data is empty: {describe_source(self.config, 'val')}")

    def _check_length(self, n_tokens: int, n_documents: int) -> None:
        """After a training epoch: a corpus must fill at least one block (EOS included)."""
        needed = self.config.block_size + 1
        source = describe_source(self.config, "train")
        if n_tokens == 0:
            raise DataError(f"the training corpus is empty: {source}")
        if self.config.kind == "sft" and not self.config.packing:
            return  # one padded example per block: any length fills a block
        with_eos = n_tokens + (n_documents if self.config.kind == "text" else 0)  # sft has its own
        if with_eos < needed:
            raise DataError(
                f"the training corpus ({source}) has {with_eos} tokens with EOS, "
                f"fewer than data.block_size + 1 = {needed}; lower data.block_size or add data"
            )
