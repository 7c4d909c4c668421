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
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np

from hftrain.data import cache as token_cache
from hftrain.data.batches import TrainBatches
from hftrain.data.loader import KeptTokens, LaneStream, TrainStream, val_batches
from hftrain.data.mixture import MixtureStream
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
from hftrain.errors import DataError, HftrainError
from hftrain.recipe import DataConfig
from hftrain.sft import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "BlockShuffle", "DataStreams", "TrainBatches", "batched", "collate",
           "describe_source", "lane_windows", "pack_arrays", "pad_examples",
           "resolve_files", "texts"]


def describe_source(config: DataConfig, split: str) -> str:
    """Where a split comes from, for messages."""
    if config.sources:
        return "; ".join(f"{source.name}: {describe_source(alone, split)}"
                         for source, alone in config.mixture())
    if config.dataset:
        return f"dataset {config.dataset}"
    files = config.val_files if split == "val" and config.val_files else config.train_files
    return ", ".join(files)


def texts(config: DataConfig, split: str = "train", whole: bool = False) -> Iterator[str]:
    """The text of every document of a split, in file order: a document, or a fine-tuning
    record's prompt, completion and message contents (what a tokenizer learns from).

    A document read in several pieces (a large one-document .txt) comes as its pieces, in
    order, unless `whole` asks for it joined (what evaluation scores). A mixture's sources
    come one after the other, each whole (a tokenizer learns from all of their text)."""
    if config.sources:
        for i, (source, alone) in enumerate(config.mixture()):
            with naming_source(i, source.name):
                yield from texts(alone, split, whole)
        return
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


@contextmanager
def naming_source(index: int, name: str) -> Iterator[None]:
    """A data error of a mixture's source, named: `data.sources[1] (ptb): ...`."""
    try:
        yield
    except HftrainError as exc:
        raise type(exc)(f"data.sources[{index}] ({name}): {exc}") from None


def _named(batches: Iterator[dict[str, Any]], index: int,
           name: str) -> Iterator[dict[str, Any]]:
    with naming_source(index, name):
        yield from batches


def source_seed(seed: int, index: int) -> int:
    """The shuffle seed of a mixture's source `index`: the run's for the first (so that one
    source reads as the data section alone would), a seed of its own for each other."""
    if index == 0:
        return seed
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


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
        self.sources: dict[str, DataStreams] = {}
        """With `data.sources`: each source's own streams (they share `fingerprints`)."""
        for i, (source, alone) in enumerate(config.mixture()):
            with naming_source(i, source.name):
                streams = DataStreams(alone, tokenizer, source_seed(seed, i), stateful, rank,
                                      world_size)
            streams.fingerprints = self.fingerprints
            streams.val_kept = KeptTokens(KeptTokens.budget // len(config.sources))  # shared
            self.sources[source.name] = streams
        mixture = bool(config.sources)
        self.cache = token_cache.open_for(config, tokenizer) if config.cache and not mixture \
            else None
        self.val_kept = KeptTokens()
        """The validation pieces tokenized by earlier evaluations (within a memory budget)."""

    def pieces(self, split: str) -> SplitPieces:
        if split not in self._pieces:
            self._pieces[split] = pieces = SplitPieces(self.config, split, self.world_size)
            for path, fp in pieces.fingerprints.items():
                self.fingerprints.setdefault(path, fp)
        return self._pieces[split]

    def train_batches(self, batch_size: int) -> TrainBatches:
        if self.sources:
            return MixtureStream(self._source_streams(batch_size),
                                 [source.weight for source in self.config.sources], self.seed,
                                 self.rank, batch_size, self.config.block_size,
                                 self.tokenizer.pad_token_id, self.pin_memory)
        if self.cache is not None:
            return self.cache.train_stream(batch_size, self.seed, self.rank, self.world_size,
                                           self.stateful, self.pin_memory)
        pieces = self.pieces("train")
        if self.stateful:
            return LaneStream.from_pieces(pieces, self.tokenizer, self.config, batch_size,
                                          self.rank, self.world_size)
        return TrainStream(pieces, self.tokenizer, self.config, self.seed, batch_size,
                           self.rank, self.world_size, self.pin_memory)

    def _source_streams(self, batch_size: int) -> dict[str, TrainBatches]:
        """Each source's training stream, once a first block of it has been read (on a
        stream of its own, without shuffle or workers: one piece): a source too small to
        fill a block fails here, before the run writes anything, rather than when it is
        first drawn (the mixture's first batch may not draw from every source; a cache is
        checked when it is opened)."""
        streams = {}
        for i, (name, source) in enumerate(self.sources.items()):
            with naming_source(i, name):
                streams[name] = source.train_batches(batch_size)
                if source.cache is None:
                    alone = replace(source.config, shuffle_tokens=0, num_workers=0)
                    TrainStream(source.pieces("train"), self.tokenizer, alone, self.seed, 1,
                                self.rank, self.world_size).next_block()
        return streams

    def val_sources(self, batch_size: int) -> dict[str, Iterator[dict[str, Any]]]:
        """The validation batches of each source by name (without `sources`: of the one
        corpus, named "")."""
        if not self.sources:
            return {"": self.val_batches(batch_size)}
        return {name: _named(streams.val_batches(batch_size), i, name)
                for i, (name, streams) in enumerate(self.sources.items())}

    def val_batches(self, batch_size: int) -> Iterator[dict[str, Any]]:
        """The validation split's batches (of one source: `val_sources` for a mixture)."""
        check_unchanged(self.fingerprints)  # every file read so far, training files included
        if self.cache is not None:
            return self.cache.val_batches(batch_size, self.rank, self.world_size, self.stateful)
        return val_batches(self.pieces("val"), self.tokenizer, self.config, batch_size,
                           self.rank, self.world_size, self.stateful, self.val_kept)

    def check_val(self, batch_size: int) -> None:
        """Pull one validation batch, so empty validation data fails before anything is
        written. Rank 0 always holds the first piece; another rank may rightly hold none."""
        for i, (name, streams) in enumerate(self.sources.items()):
            with naming_source(i, name):
                streams.check_val(batch_size)
        if self.sources:
            return
        first = next(self.val_batches(batch_size), None) if self.rank == 0 else None
        if self.rank == 0 and first is None:
            raise DataError(f"the validation data is empty: {describe_source(self.config, 'val')}")
        if first is not None:
            self.check_scored(first, "val")

    def check_scored(self, batch: dict[str, Any], split: str = "train") -> None:
        """A first batch of examples (each in a block of its own) must score something: a
        prompt longer than the block cuts its completion off, and a split of such examples
        would train on nothing (a zero loss) or be validated on nothing."""
        if not self.config.one_example_per_block:
            return
        labels = [batch[k] for k in ("labels", "rejected_labels") if k in batch]
        if not any(bool((rows != IGNORE_INDEX).any()) for rows in labels):
            raise DataError(
                f"no example in the first {split} batch of {describe_source(self.config, split)}"
                f" has a completion token within data.block_size ({self.config.block_size}): "
                "its prompts fill the block; raise data.block_size or shorten the prompts")
