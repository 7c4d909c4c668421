"""Data: files -> pieces -> documents -> tokens (in background workers) -> blocks -> batches.

- `sources`: data files cut into pieces, and the documents of a piece (with the hold-out).
- `packing`: blocks, lanes, batches and the seeded block shuffle.
- `loader`: the training stream (workers, exact position) and the validation stream.
- `cache`: a memory-mapped token cache for corpora read many times.

`DataStreams` puts them together for a run. A row that cannot be read or used (not UTF-8,
malformed JSON, a null text) stops the stream with a DataError naming its file and line, and
so does a data file that changes while a run reads it (`hftrain.data_check`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from hftrain.data import cache as token_cache
from hftrain.data.batches import TrainBatches
from hftrain.data.loader import KeptTokens, LaneStream, TrainStream, val_batches
from hftrain.data.packing import (
    BlockShuffle,
    batched,
    collate,
    lane_windows,
    pack_arrays,
    pad_examples,
)
from hftrain.data.sources import SplitPieces, resolve_files
from hftrain.data_check import check_unchanged
from hftrain.errors import DataError
from hftrain.recipe import DataConfig
from hftrain.sft import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "BlockShuffle", "DataStreams", "TrainBatches", "batched", "collate",
           "describe_source", "lane_windows", "pack_arrays", "pad_examples",
           "resolve_files", "texts"]


def describe_source(config: DataConfig, split: str) -> str:
    """Where a split comes from, for messages."""
    if config.dataset:
        return f"dataset {config.dataset}"
    files = config.val_files if split == "val" and config.val_files else config.train_files
    return ", ".join(files)


def texts(config: DataConfig, split: str = "train", whole: bool = False) -> Iterator[str]:
    """The text of every document of a split, in file order: a document, or a fine-tuning
    record's prompt, completion and message contents (what a tokenizer learns from).

    A document read in several pieces (a large one-document .txt) comes as its pieces, in
    order, unless `whole` asks for it joined (what evaluation scores)."""
    pieces = SplitPieces(config, split)
    fragments: list[str] = []
    for piece in pieces.pieces:
        for document in pieces.documents(piece):
            if isinstance(document, str) and whole and not piece.ends_document:
                fragments.append(document)
            elif isinstance(document, str):
                yield "".join([*fragments, document]) if fragments else document
                fragments = []
            else:
                parts = [document.get("prompt"), document.get("completion")]
                parts += [m.get("content") for m in document.get("messages") or []]
                yield "\n".join(p for p in parts if isinstance(p, str))


class DataStreams:
    """The recipe's training and validation streams for one rank, tokenized and packed.

    `train_batches()` is endless and stateful (`state_dict`/`load_state_dict`: the exact
    position, restored without replay); `val_batches()` reads the validation split once, in
    order, padding the tail so that every token is scored. With `stateful`, both lay their
    stream out in lanes instead of shuffled blocks, and the first batch of every pass carries
    `reset_state=True`. With `data.cache`, both read a memory-mapped token cache.
    """

    def __init__(self, config: DataConfig, tokenizer: Any, seed: int, stateful: bool = False,
                 rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> None:
        self.config, self.tokenizer, self.seed = config, tokenizer, seed
        self.stateful, self.rank, self.world_size = stateful, rank, world_size
        self.pin_memory = pin_memory
        self._pieces: dict[str, SplitPieces] = {}
        self.fingerprints: dict[str, tuple[int, int]] = {}
        """(size, mtime_ns) of every local file read, taken when its stream is first built."""
        self.cache = token_cache.open_for(config, tokenizer) if config.cache else None
        self.val_kept = KeptTokens()
        """The validation pieces tokenized by earlier evaluations (within a memory budget)."""

    def pieces(self, split: str) -> SplitPieces:
        if split not in self._pieces:
            self._pieces[split] = pieces = SplitPieces(self.config, split, self.world_size)
            for path, fp in pieces.fingerprints.items():
                self.fingerprints.setdefault(path, fp)
        return self._pieces[split]

    def train_batches(self, batch_size: int) -> TrainBatches:
        if self.cache is not None:
            return self.cache.train_stream(batch_size, self.seed, self.rank, self.world_size,
                                           self.stateful, self.pin_memory)
        pieces = self.pieces("train")
        if self.stateful:
            return LaneStream.from_pieces(pieces, self.tokenizer, self.config, batch_size,
                                          self.rank, self.world_size)
        return TrainStream(pieces, self.tokenizer, self.config, self.seed, batch_size,
                           self.rank, self.world_size, self.pin_memory)

    def val_batches(self, batch_size: int) -> Iterator[dict[str, Any]]:
        check_unchanged(self.fingerprints)  # every file read so far, training files included
        if self.cache is not None:
            return self.cache.val_batches(batch_size, self.rank, self.world_size, self.stateful)
        return val_batches(self.pieces("val"), self.tokenizer, self.config, batch_size,
                           self.rank, self.world_size, self.stateful, self.val_kept)

    def check_val(self, batch_size: int) -> None:
        """Pull one validation batch, so empty validation data fails before anything is
        written. Rank 0 always holds the first piece; another rank may rightly hold none."""
        if self.rank == 0 and next(self.val_batches(batch_size), None) is None:
            raise DataError(f"the validation data is empty: {describe_source(self.config, 'val')}")
