"""Packing token streams into fixed-shape blocks and batches; the seeded block shuffle.

Each block holds `block_size + 1` tokens and overlaps the next by one, so inputs are
`block[:-1]` and targets `block[1:]`: every token after the first is a target exactly once.
A block is 1-D token ids (every next token is a target) or a 2-D array of named rows
(`collate`): ids and labels for fine-tuning examples (prompt tokens are IGNORE_INDEX in the
labels), example starts for packed examples, bytes for evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from hftrain.sft import IGNORE_INDEX


def pack_arrays(
    arrays: Iterable[np.ndarray], block_size: int, pad_tail: bool = False
) -> Iterator[np.ndarray]:
    """Join arrays whose last axis is tokens (1-D ids, or (2, n) ids and labels of
    fine-tuning examples) and cut them into blocks of `block_size + 1`.

    Documents come with their EOS already appended. Consecutive blocks share one token (the
    last target of a block is the first input of the next). With `pad_tail`, the final
    partial block is padded with IGNORE_INDEX so that every token is scored (evaluation);
    without, the tail waits for more documents (training, where the stream repeats)."""
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
        block = np.full((example.shape[0], width), IGNORE_INDEX, dtype=np.int64)
        block[:, : example.shape[1]] = example
        yield block


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
    epoch is padded to full width, keeping shapes fixed. `tokens` may have rows (ids and
    bytes): the last axis is the stream.
    """
    n_targets = tokens.shape[-1] - 1
    lane_len = -(-n_targets // n_lanes) if pad_tail else n_targets // n_lanes
    if pad_tail:
        padding = np.full((*tokens.shape[:-1], lane_len * n_lanes - n_targets), IGNORE_INDEX,
                          dtype=np.int64)
        tokens = np.concatenate([tokens, padding], axis=-1)
    lanes = np.stack([tokens[..., j * lane_len : (j + 1) * lane_len + 1] for j in range(n_lanes)])
    for start in range(0, lane_len, window):
        chunk = lanes[..., start : start + window + 1]  # (n_lanes, [rows,] <= window + 1)
        missing = window + 1 - chunk.shape[-1]
        if missing:
            widths = [(0, 0)] * (chunk.ndim - 1) + [(0, missing)]
            chunk = np.pad(chunk, widths, constant_values=IGNORE_INDEX)
        yield list(chunk)


def collate(blocks: list[np.ndarray], batch_size: int, pad_id: int,
            rows: tuple[str, ...] = ("ids", "labels")) -> dict[str, torch.Tensor]:
    """Stack blocks into fixed-shape batch tensors; missing rows of the batch are all padding.

    A block is 1-D token ids (every next token is a target) or an array whose rows `rows`
    names: "ids"; "labels" (the ids where absent); "starts", 1 where a packed fine-tuning
    example starts, which become `position_ids` counting from each example's start, so that
    the model's attention keeps examples apart (transformers builds a block-diagonal mask
    from them, as for its `DataCollatorWithFlattening`); "bytes", the UTF-8 bytes each token
    stands for (`byte_counts` of the targets, for bits per byte); "rejected_ids" and
    "rejected_labels", the other side of a preference pair (`rejected_input_ids`,
    `rejected_labels`).
    """
    stacked = np.stack(blocks)
    if stacked.ndim == 2:
        stacked, rows = stacked[:, None, :], ("ids",)
    full = np.full((batch_size, *stacked.shape[1:]), IGNORE_INDEX, dtype=np.int64)
    full[: len(blocks)] = stacked
    named = dict(zip(rows, full.transpose(1, 0, 2), strict=True))
    ids = named["ids"]
    inputs = torch.from_numpy(ids[:, :-1].copy())
    inputs[inputs == IGNORE_INDEX] = pad_id
    labels = named.get("labels", ids)
    batch = {"input_ids": inputs, "labels": torch.from_numpy(labels[:, 1:].copy())}
    if "starts" in named:
        batch["position_ids"] = torch.from_numpy(example_positions(named["starts"][:, :-1]))
    if "rejected_ids" in named:
        rejected = torch.from_numpy(named["rejected_ids"][:, :-1].copy())
        rejected[rejected == IGNORE_INDEX] = pad_id
        batch["rejected_input_ids"] = rejected
        batch["rejected_labels"] = torch.from_numpy(named["rejected_labels"][:, 1:].copy())
    if "bytes" in named:
        batch["byte_counts"] = torch.from_numpy(np.maximum(named["bytes"][:, 1:], 0))
    return batch


def example_positions(starts: np.ndarray) -> np.ndarray:
    """Position ids that restart at 0 where `starts` is 1 (and at the start of each row)."""
    index = np.broadcast_to(np.arange(starts.shape[-1]), starts.shape)
    last_start = np.maximum.accumulate(np.where(starts == 1, index, 0), axis=-1)
    return index - last_start


def batched(blocks: Iterable[np.ndarray], batch_size: int, pad_id: int,
            rows: tuple[str, ...] = ("ids", "labels")) -> Iterator[dict]:
    pending: list[np.ndarray] = []
    for block in blocks:
        pending.append(block)
        if len(pending) == batch_size:
            yield collate(pending, batch_size, pad_id, rows)
            pending = []
    if pending:
        yield collate(pending, batch_size, pad_id, rows)


class KeyedDraws:
    """Random draws whose k-th comes from a generator keyed by (`key`, k // CHUNK), not from
    a generator carried along: a stream's whole random state is the count of its draws, so
    a checkpoint holds one number and a resume continues exactly. `make_chunk(seeds)` turns
    a chunk's SeedSequence into its CHUNK values (Python ints: a lookup per draw, not
    numpy); the chunk in use is kept."""

    CHUNK = 4096

    def __init__(self, key: list[int], make_chunk: Callable[[np.random.SeedSequence],
                                                            list[int]]) -> None:
        self.key, self.make_chunk = key, make_chunk
        self._chunk: tuple[int, list[int]] | None = None

    def take(self, first: int, n: int) -> list[int]:
        """Draws first, ..., first + n - 1."""
        values: list[int] = []
        while len(values) < n:
            number, offset = divmod(first + len(values), self.CHUNK)
            if self._chunk is None or self._chunk[0] != number:
                seeds = np.random.SeedSequence([*self.key, number])
                self._chunk = number, self.make_chunk(seeds)
            values += self._chunk[1][offset : offset + n - len(values)]
        return values


class BlockShuffle:
    """A seeded shuffle buffer of `capacity` blocks whose whole state is its contents and a
    count: once full, each arriving block replaces a random held one, which is emitted.

    The random index of draw k comes from `KeyedDraws` keyed by (seed, rank), so the state to
    checkpoint is `blocks` and `draws`.
    """

    def __init__(self, capacity: int, seed: int, rank: int) -> None:
        self.capacity, self.seed, self.rank = capacity, seed, rank
        self.blocks: list[np.ndarray] = []
        self.draws = 0
        self._indices = KeyedDraws([seed, rank], self._chunk_of_indices)

    def push(self, block: np.ndarray) -> np.ndarray | None:
        """Hold `block`; return the block that leaves the buffer, or None while it fills."""
        if self.capacity <= 1:
            return block
        if len(self.blocks) < self.capacity:
            self.blocks.append(block)
            return None
        [i] = self._indices.take(self.draws, 1)
        self.draws += 1
        out, self.blocks[i] = self.blocks[i], block
        return out

    def _chunk_of_indices(self, seeds: np.random.SeedSequence) -> list[int]:
        raw = np.random.PCG64(seeds).random_raw(KeyedDraws.CHUNK) % np.uint64(self.capacity)
        return raw.tolist()
