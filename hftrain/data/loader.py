"""The training and validation streams: pieces tokenized in background workers, packed,
shuffled and batched, with a position that is saved and restored instead of replayed.

Work is split in two. Reading and tokenizing a piece (`PieceTokenizer`), which is nearly all
of the cost, runs in `data.num_workers` worker processes of a plain `torch.utils.data.DataLoader`
fed a deterministic piece order (`PieceOrder`); the loader returns pieces in that order
whatever the number of workers. Packing, the block shuffle and batching run on the training
process (microseconds a batch), in `TrainStream`, which therefore knows its exact position
between any two batches: the epoch, the next piece, the tokens carried from the last piece,
the blocks in the shuffle buffer and the number of random draws. `state_dict()` returns that
position as tensors; `load_state_dict()` restores it and restarts the workers at the next
piece, so a resume costs at most one piece of tokenization, whatever the step.

Rank r reads pieces r, r + N, ... of each epoch's order. What a run trains on therefore
depends on the number of processes (not on the number of workers): N processes see disjoint
pieces, together every piece once per epoch; a resume needs the same number of processes.
"""

from __future__ import annotations

import functools
import itertools
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from hftrain.data.batches import TrainBatches
from hftrain.data.packing import (
    BlockShuffle,
    batched,
    collate,
    lane_windows,
    pack_arrays,
    pad_examples,
)
from hftrain.data.sources import Piece, SplitPieces
from hftrain.data_check import check_unchanged
from hftrain.errors import DataError
from hftrain.framing import Framing, token_bytes
from hftrain.recipe import DataConfig
from hftrain.records import RECORD_KINDS
from hftrain.sft import IGNORE_INDEX
from hftrain.workers import worker_context, worker_count, worker_init

PREFETCH_PIECES = 4
"""Pieces each worker tokenizes ahead of the training process."""


@dataclass
class Tokenized:
    """One piece, tokenized: its documents' tokens end to end, framed by start and end tokens
    (`hftrain.framing`), as 1-D ids or the rows `PieceTokenizer.rows` names; or why it could
    not be read."""

    tokens: np.ndarray
    lengths: np.ndarray
    """Tokens of each document (fine-tuning: each example), start and EOS included."""
    error: str | None = None
    """Why the piece could not be read (a worker cannot raise across the process boundary)."""

    def checked(self) -> Tokenized:
        """This piece, or the DataError its worker found (naming the file and line)."""
        if self.error is not None:
            raise DataError(self.error)
        return self


@dataclass
class KeptTokens:
    """Tokenized validation pieces kept between evaluations, up to `budget` bytes in each
    process: evaluation re-reads the same split every `eval.interval` steps, and tokenizing
    it with character offsets is the slow half of reading it. 256 MB holds ~16M tokens of
    text with their byte counts (~8M of fine-tuning examples, which carry four rows); pieces
    past the budget are tokenized again each time, so memory stays bounded. A file changed
    since it was first read is still refused at the next evaluation (`DataStreams.val_batches`
    checks every file's size and time before reading)."""

    budget: int = 256 << 20
    pieces: dict[int, Tokenized] = field(default_factory=dict)
    used: int = 0

    def keep(self, index: int, item: Tokenized) -> Tokenized:
        size = item.tokens.nbytes + item.lengths.nbytes
        if item.error is None and self.used + size <= self.budget:
            self.pieces[index], self.used = item, self.used + size
        return item


class PieceTokenizer(Dataset):
    """Reads and tokenizes pieces of a split, by index: what the loader's workers run.

    Training reads `encode_batch_fast`, which skips the character offsets (4x faster than
    `encode_batch` on a 1 MB document); evaluation (`with_bytes`) reads them, to count the
    bytes each token stands for. A data error becomes `Tokenized.error`, raised by the
    training process as one line instead of a worker traceback.
    """

    def __init__(self, pieces: SplitPieces, tokenizer: Any, with_bytes: bool = False,
                 kept: KeptTokens | None = None) -> None:
        self.pieces, self.tokenizer, self.with_bytes = pieces, tokenizer, with_bytes
        self.kept = kept
        self.framing = Framing.of(tokenizer)
        self.records = RECORD_KINDS.get(pieces.config.kind)
        """How records are encoded (kinds sft and preference); None: text."""
        self.sft = pieces.config.kind == "sft"
        rows = ("ids", "labels", "starts") if self.sft else \
            self.records.rows if self.records else ("ids",)
        self.rows = (*rows, "bytes") if with_bytes else rows
        """The rows of `Tokenized.tokens` (`packing.collate`); 1-D when only ids."""

    def __len__(self) -> int:
        return len(self.pieces.pieces)

    def __getitem__(self, index: int) -> Tokenized:
        if self.kept is None:
            return self._tokenized(index)
        kept = self.kept.pieces.get(index)
        return kept if kept is not None else self.kept.keep(index, self._tokenized(index))

    def _tokenized(self, index: int) -> Tokenized:
        piece = self.pieces.pieces[index]
        try:
            return self._records(piece) if self.records else self._texts(piece)
        except DataError as exc:
            empty = np.empty(0, dtype=np.int64)
            return Tokenized(empty, empty, error=str(exc))

    def _texts(self, piece: Piece) -> Tokenized:
        documents = list(self.pieces.documents(piece))
        backend = self.tokenizer.backend_tokenizer
        encode = backend.encode_batch if self.with_bytes else backend.encode_batch_fast
        encodings = encode(documents, add_special_tokens=False)
        ids, counts, last = [], [], len(documents) - 1
        for i, (text, encoding) in enumerate(zip(documents, encodings, strict=True)):
            # a document read in pieces starts in the first and ends in the last
            begins, ends = i > 0 or piece.starts_document, i < last or piece.ends_document
            ids.append(self.framing.document(encoding.ids, begins, ends))
            if self.with_bytes:
                counts.append(token_bytes(self.framing, text, encoding, begins, ends))
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64,
                             count=int(lengths.sum()))
        if self.with_bytes:
            tokens = np.stack([tokens, np.concatenate([np.empty(0, np.int64), *counts])])
        return Tokenized(tokens, lengths)

    def _records(self, piece: Piece) -> Tokenized:
        examples = [self.records.encode(record, self.tokenizer, self.with_bytes)
                    for record in self.pieces.documents(piece)]
        lengths = np.array([e.shape[1] for e in examples], dtype=np.int64)
        if not examples:
            return Tokenized(np.empty((len(self.rows), 0), np.int64), lengths)
        tokens = np.concatenate(examples, axis=1).astype(np.int64)
        if not self.sft:  # preference pairs: one per block, never packed
            return Tokenized(tokens, lengths)
        starts = np.zeros(tokens.shape[1], dtype=np.int64)
        starts[np.cumsum(lengths) - lengths] = 1
        return Tokenized(np.insert(tokens, 2, starts, axis=0), lengths)

    def opening(self, first_piece: int) -> np.ndarray:
        """What a stream that begins with piece `first_piece` opens with: the start token of
        its first document when every later one's is the previous one's EOS (in the rows of
        `Tokenized.tokens`; empty for fine-tuning examples, which open themselves)."""
        starts = first_piece < len(self.pieces.pieces) and \
            self.pieces.pieces[first_piece].starts_document
        ids = np.asarray(self.framing.opening if starts and not self.records else [],
                         np.int64)
        if len(self.rows) == 1:
            return ids
        opening = np.zeros((len(self.rows), len(ids)), dtype=np.int64)
        opening[0] = ids
        return opening


class PieceOrder:
    """The pieces rank r reads in epoch e: a seeded permutation of all pieces (or their order
    in the files, without shuffling), of which rank r takes every N-th from the r-th."""

    def __init__(self, n_pieces: int, rank: int, world_size: int, seed: int,
                 shuffle: bool) -> None:
        self.n_pieces, self.rank, self.world_size = n_pieces, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.per_epoch = len(range(rank, n_pieces, world_size))

    def epoch(self, epoch: int) -> np.ndarray:
        order = np.arange(self.n_pieces)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n_pieces)
        return order[self.rank :: self.world_size]


class _FromPosition(Sampler):
    """Piece indices in `order` from (epoch, next_piece) on, forever."""

    def __init__(self, order: PieceOrder, epoch: int, next_piece: int) -> None:
        self.order, self.start = order, (epoch, next_piece)

    def __iter__(self) -> Iterator[int]:
        epoch, next_piece = self.start
        for e in itertools.count(epoch):
            yield from (int(i) for i in self.order.epoch(e)[next_piece if e == epoch else 0 :])


def _as_is(item: Tokenized) -> Tokenized:
    return item


def piece_loader(tokenize: PieceTokenizer, sampler: Sampler, num_workers: int) -> DataLoader:
    # A generator of its own: a loader started (or restarted on resume) must not draw from
    # the global RNG, which seeds the model's weights and dropout.
    num_workers = worker_count(num_workers)
    return DataLoader(tokenize, sampler=sampler, batch_size=None, collate_fn=_as_is,
                      generator=torch.Generator(),
                      num_workers=num_workers,
                      worker_init_fn=functools.partial(worker_init, trainer=os.getpid()),
                      multiprocessing_context=worker_context() if num_workers else None,
                      prefetch_factor=PREFETCH_PIECES if num_workers else None)


def _stop_workers(loader: Iterator[Tokenized]) -> None:
    shutdown = getattr(loader, "_shutdown_workers", None)  # absent without workers
    if shutdown is not None:
        shutdown()


class TrainStream(TrainBatches):
    """This rank's endless stream of training batches, with an exact, cheap position.

    Pieces are packed (documents joined by EOS, cut into overlapping blocks; fine-tuning
    examples packed or padded one per block), blocks go through a `BlockShuffle` of
    `data.shuffle_tokens // block_size` blocks, and `batch_size` blocks make a batch.
    """

    def __init__(self, pieces: SplitPieces, tokenizer: Any, config: DataConfig, seed: int,
                 batch_size: int, rank: int = 0, world_size: int = 1,
                 pin_memory: bool = False) -> None:
        self.pieces, self.config, self.batch_size = pieces, config, batch_size
        self.tokenize = PieceTokenizer(pieces, tokenizer)
        self.pad_id, self.pin_memory = tokenizer.pad_token_id, pin_memory
        self.width = config.block_size + 1
        shuffle = config.shuffle_tokens > 0
        self.order = PieceOrder(len(pieces.pieces), rank, world_size, seed, shuffle)
        if not pieces.pieces:
            raise DataError(f"the training corpus is empty: {pieces.source.name}")
        if self.order.per_epoch == 0:
            raise DataError(f"the training data ({pieces.source.name}) has "
                            f"{len(pieces.pieces)} pieces, fewer than the {world_size} "
                            "processes that must share them; add data or use fewer processes")
        capacity = config.shuffle_tokens // config.block_size if shuffle else 0
        self.shuffle = BlockShuffle(capacity, seed, rank)
        self.one_example_per_block = config.one_example_per_block
        self.epoch = self.next_piece = 0
        self.carry = self.tokenize.opening(int(self.order.epoch(0)[0]))
        self.carry_lengths = np.empty(0, dtype=np.int64)
        self.counters = {"pieces": 0, "documents": 0, "tokens": 0}
        """What this rank has read and tokenized since the run (or the resume) started."""
        self._epoch_tokens = 0
        self.last_epoch_tokens = 0
        self._loader: Iterator[Tokenized] | None = None

    @property
    def rows(self) -> tuple[str, ...]:
        return self.tokenize.rows

    def _next_batch(self) -> dict[str, torch.Tensor]:
        blocks = [self.next_block() for _ in range(self.batch_size)]
        batch = collate(blocks, self.batch_size, self.pad_id, self.rows)
        if self.pin_memory:  # lets the copy to the GPU run without blocking the host
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch

    def epoch_tokens(self) -> float | None:
        """Token positions of blocks in this rank's last whole epoch (its tokens; one block
        per example when each example has its own block); in the first, estimated from the
        pieces read so far (None before the first piece)."""
        if self.last_epoch_tokens:
            return self.last_epoch_tokens
        return self._epoch_tokens * self.order.per_epoch / self.next_piece \
            if self.next_piece else None

    def next_block(self) -> np.ndarray:
        """The next block of the shuffled stream (a batch is `batch_size` of them)."""
        while True:
            out = self.shuffle.push(self._packed_block())
            if out is not None:
                return out

    def _packed_block(self) -> np.ndarray:
        if self.one_example_per_block:  # cut or padded
            while len(self.carry_lengths) == 0:
                self._take_piece()
            n, self.carry_lengths = int(self.carry_lengths[0]), self.carry_lengths[1:]
            example, self.carry = self.carry[:, :n], self.carry[:, n:]
            return next(pad_examples([example], self.config.block_size))
        while self.carry.shape[-1] < self.width:
            self._take_piece()
        block = self.carry[..., : self.width].copy()  # not a view holding the whole piece
        self.carry = self.carry[..., self.config.block_size :]
        return block

    def _take_piece(self) -> None:
        if self._loader is None:
            sampler = _FromPosition(self.order, self.epoch, self.next_piece)
            self._loader = iter(piece_loader(self.tokenize, sampler, self.config.num_workers))
            # Stop the workers when the stream is closed, collected, or left open at exit: a
            # worker blocked writing a piece nobody reads would otherwise hang the exit.
            self._stop_workers = weakref.finalize(self, _stop_workers, self._loader)
        item = next(self._loader).checked()
        self.carry = np.concatenate([self.carry, item.tokens], axis=-1)
        if self.one_example_per_block:  # the only case that cuts by document
            self.carry_lengths = np.concatenate([self.carry_lengths, item.lengths])
        self.counters["pieces"] += 1
        self.counters["documents"] += len(item.lengths)
        self.counters["tokens"] += item.tokens.shape[-1]
        # what the epoch fills: its tokens, or (one example a block) a block per example
        self._epoch_tokens += len(item.lengths) * self.config.block_size \
            if self.one_example_per_block else item.tokens.shape[-1]
        self.next_piece += 1
        if self.next_piece == self.order.per_epoch:
            self._end_epoch()

    def _end_epoch(self) -> None:
        """After this rank's last piece of an epoch (the position moves on first, so that a
        failure here leaves a valid one): the files are unchanged (a file cut short mid-epoch
        ends it early), and the data fills at least one block."""
        n_tokens, self._epoch_tokens = self._epoch_tokens, 0
        self.last_epoch_tokens = n_tokens
        self.epoch, self.next_piece = self.epoch + 1, 0
        check_unchanged(self.pieces.fingerprints)
        check_length(self.config, self.pieces.source.name, n_tokens, self.order.world_size)

    def _snapshot(self) -> tuple:
        return (list(self.shuffle.blocks), self.shuffle.draws, self.carry, self.carry_lengths,
                self.epoch, self.next_piece, self._epoch_tokens, self.last_epoch_tokens,
                dict(self.counters))

    def _restore(self, snapshot: tuple) -> None:
        (self.shuffle.blocks, self.shuffle.draws, self.carry, self.carry_lengths, self.epoch,
         self.next_piece, self._epoch_tokens, self.last_epoch_tokens, self.counters) = snapshot

    def _position(self) -> dict[str, torch.Tensor]:
        blocks = self.shuffle.blocks
        buffer = np.stack(blocks) if blocks else np.empty((0, *self.carry.shape[:-1],
                                                            self.width), dtype=np.int64)
        position = [self.epoch, self.next_piece, self.shuffle.draws, self.order.n_pieces,
                    self._epoch_tokens, self.last_epoch_tokens]
        return {"data.position": torch.tensor(position, dtype=torch.int64),
                "data.carry": torch.from_numpy(np.ascontiguousarray(self.carry)),
                "data.carry_lengths": torch.from_numpy(self.carry_lengths.copy()),
                "data.shuffle_buffer": torch.from_numpy(buffer)}

    def _load_position(self, state: dict[str, torch.Tensor]) -> None:
        """The workers restart at the saved position's next piece."""
        epoch, next_piece, draws, n_pieces, epoch_tokens, *last = (
            int(v) for v in state["data.position"].tolist())  # (no last: before mixtures)
        if n_pieces != self.order.n_pieces:
            raise DataError(
                f"the training data ({self.pieces.source.name}) is cut into {self.order.n_pieces}"
                f" pieces now, {n_pieces} when the checkpoint was saved: its files changed "
                "size, so the saved position no longer points into them")
        self.close()
        self.epoch, self.next_piece = epoch, next_piece
        self._epoch_tokens, self.last_epoch_tokens = epoch_tokens, (last or [0])[0]
        self.carry = state["data.carry"].cpu().numpy().astype(np.int64)
        self.carry_lengths = state["data.carry_lengths"].cpu().numpy().astype(np.int64)
        buffer = state["data.shuffle_buffer"].cpu().numpy().astype(np.int64)
        self.shuffle.blocks = list(buffer)
        self.shuffle.draws = draws
        if not 0 <= next_piece <= self.order.per_epoch:
            raise DataError(f"the saved data position (piece {next_piece} of an epoch) does not "
                            f"fit the {self.order.per_epoch} pieces this process reads per epoch")

    def close(self) -> None:
        """Stop the workers (also done when the stream is collected, and at exit)."""
        if self._loader is not None:
            self._stop_workers()
            self._loader = None


def check_length(config: DataConfig, source: str, n_tokens: int, world_size: int) -> None:
    """After a training epoch: the data must fill at least one block (EOS included)."""
    if n_tokens == 0:
        raise DataError(f"the training corpus is empty: {source}")
    if config.one_example_per_block:
        return  # one padded example per block: any length fills a block
    needed = config.block_size + 1
    if n_tokens < needed:
        each = " for each process" if world_size > 1 else ""
        raise DataError(
            f"the training corpus ({source}) has {n_tokens} tokens with EOS{each}, "
            f"fewer than data.block_size + 1 = {needed}; lower data.block_size or add data"
        )


def read_all(tokenize: PieceTokenizer, indices: list[int], num_workers: int) -> np.ndarray:
    """The tokens of the given pieces, end to end (in order, tokenized by the workers), after
    the stream's opening."""
    loader = piece_loader(tokenize, indices, min(num_workers, len(indices)))
    opening = tokenize.opening(indices[0] if indices else len(tokenize))
    return np.concatenate([opening, *(item.checked().tokens for item in loader)], axis=-1)


class LaneStream(TrainBatches):
    """Stateful (truncated BPTT) training: each pass over the corpus is one token array laid
    out in lanes (`lane_windows`), the same every epoch, so the position is (epoch, window).

    The lanes of all ranks are laid out over the whole corpus and each rank keeps its own, so
    N processes with batch B/N train on exactly the batches one process with batch B would;
    every rank tokenizes the whole corpus (once: it is held in memory, which suits the small
    corpora recurrent models train on).
    """

    def __init__(self, read_tokens: Any, name: str, fingerprints: dict[str, tuple[int, int]],
                 config: DataConfig, batch_size: int, rank: int, world_size: int,
                 pad_id: int) -> None:
        self.read_tokens, self.name, self.fingerprints = read_tokens, name, fingerprints
        self.config, self.batch_size, self.pad_id = config, batch_size, pad_id
        self.lanes, self.first = batch_size * world_size, rank * batch_size
        self.epoch = self.window = 0
        self._windows: list[list[np.ndarray]] | None = None
        self.counters = {"pieces": 0, "documents": 0, "tokens": 0}

    @classmethod
    def from_pieces(cls, pieces: SplitPieces, tokenizer: Any, config: DataConfig,
                    batch_size: int, rank: int = 0, world_size: int = 1) -> LaneStream:
        tokenize = PieceTokenizer(pieces, tokenizer)
        every = list(range(len(pieces.pieces)))
        return cls(lambda: read_all(tokenize, every, config.num_workers), pieces.source.name,
                   pieces.fingerprints, config, batch_size, rank, world_size,
                   tokenizer.pad_token_id)

    def _next_batch(self) -> dict[str, Any]:
        windows = self._epoch_windows()
        if self.window == len(windows):
            check_unchanged(self.fingerprints)
            self.epoch, self.window = self.epoch + 1, 0
        rows = windows[self.window]
        batch = collate(rows[self.first : self.first + self.batch_size], self.batch_size,
                        self.pad_id)
        batch["reset_state"] = self.window == 0
        self.window += 1
        return batch

    def _epoch_windows(self) -> list[list[np.ndarray]]:
        if self._windows is None:
            tokens = self.read_tokens()
            self.counters.update(tokens=len(tokens))
            if len(tokens) <= self.lanes:
                raise DataError(
                    f"the training corpus ({self.name}) has {len(tokens)} tokens,"
                    f" too few for {self.lanes} lanes of at least one token")
            self._windows = list(lane_windows(tokens, self.lanes, self.config.block_size))
        return self._windows

    def _snapshot(self) -> tuple:
        return self.epoch, self.window

    def _restore(self, snapshot: tuple) -> None:
        self.epoch, self.window = snapshot

    def _position(self) -> dict[str, torch.Tensor]:
        n_windows = len(self._epoch_windows())
        return {"data.position": torch.tensor([self.epoch, self.window, n_windows],
                                              dtype=torch.int64)}

    def _load_position(self, state: dict[str, torch.Tensor]) -> None:
        self.epoch, self.window, n_windows = (int(v) for v in state["data.position"].tolist())
        if n_windows != len(self._epoch_windows()):
            raise DataError(f"the training data ({self.name}) makes {len(self._epoch_windows())}"
                            f" windows per pass now, {n_windows} when the checkpoint was saved: "
                            "it changed, so the saved position no longer points into it")


def val_batches(pieces: SplitPieces, tokenizer: Any, config: DataConfig, batch_size: int,
                rank: int, world_size: int, stateful: bool,
                kept: KeptTokens | None = None) -> Iterator[dict[str, Any]]:
    """The validation split once, in order, the tail padded so that every token after the
    first is scored: rank r packs pieces r, r + N, ... (so with N processes the first token of
    each rank's first piece, N tokens in all, has no context and is not scored); stateful
    evaluation lays all ranks' lanes over the whole split, as `LaneStream` does. Pieces in
    `kept` are not tokenized again."""
    tokenize = PieceTokenizer(pieces, tokenizer, with_bytes=True, kept=kept)
    if stateful:
        tokens = read_all(tokenize, list(range(len(pieces.pieces))), 0)
        yield from lane_val_batches(tokens, batch_size, rank, world_size, config.block_size,
                                    tokenizer.pad_token_id)
        return
    mine = list(range(rank, len(pieces.pieces), world_size))
    documents = (tokenize[i].checked() for i in mine)
    if config.one_example_per_block:
        blocks: Iterator[np.ndarray] = pad_examples(
            (ex for item in documents if len(item.lengths)  # a piece may hold no records
             for ex in np.split(item.tokens, np.cumsum(item.lengths)[:-1], axis=1)),
            config.block_size)
    else:
        opening = tokenize.opening(mine[0] if mine else len(tokenize))
        arrays = itertools.chain([opening], (item.tokens for item in documents))
        blocks = pack_arrays(arrays, config.block_size, pad_tail=True)
    yield from batched(blocks, batch_size, tokenizer.pad_token_id, tokenize.rows)


def lane_val_batches(tokens: np.ndarray, batch_size: int, rank: int, world_size: int,
                     block_size: int, pad_id: int) -> Iterator[dict[str, Any]]:
    """Stateful evaluation of a token stream (ids, or rows of ids and bytes): the lanes of all
    ranks laid over it (the last one padded so that every token is scored), rank r keeping its
    `batch_size` of them."""
    if tokens.shape[-1] < 2:
        return
    lanes, first = batch_size * world_size, rank * batch_size
    array = np.asarray(tokens, dtype=np.int64)
    names = ("ids", "bytes") if array.ndim == 2 else ("ids",)
    for i, rows in enumerate(lane_windows(array, lanes, block_size, pad_tail=True)):
        batch = collate(rows[first : first + batch_size], batch_size, pad_id, names)
        batch["reset_state"] = i == 0
        yield batch

__all__ = ["IGNORE_INDEX", "LaneStream", "PieceTokenizer", "TrainStream", "val_batches"]
