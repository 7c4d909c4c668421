"""A weighted mixture of training sources (`data.sources`): each block is drawn from one
source, chosen at random in proportion to the weights.

Why by hand: torchdata's `MultiNodeWeightedSampler` and `datasets.interleave_datasets` mix
whole iterables and keep their random generator's state (or replay from the start) to resume;
litgpt's `CombinedStreamingDataset` and Megatron's `BlendedDataset` are tied to their own
loaders. hftrain's streams already resume exactly in O(1), so the mixture needs only a
choice per block that is itself exact to resume: the source of draw k comes from a
counter-keyed generator (seed, rank, k // 4096), as `packing.BlockShuffle`'s draws do, and
the whole mixture position is k plus each source's own position. Each source is a stream of
its own (pieces and workers, or a token cache) with its own shuffle, read only when drawn;
draws on N processes are keyed by rank, so together they keep the proportions.

One source is the plain stream: every draw picks it, so its batches are the ones the data
section would give without `sources`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hftrain.data.batches import TrainBatches
from hftrain.data.packing import KeyedDraws, collate
from hftrain.errors import DataError


class MixtureStream(TrainBatches):
    """Batches of blocks drawn from `sources` (block streams: `next_block()`, `rows`,
    `epoch_tokens()`) in proportion to `weights`; `blocks_drawn[i]` counts source i's."""

    def __init__(self, sources: dict[str, Any], weights: list[float], seed: int, rank: int,
                 batch_size: int, block_size: int, pad_id: int,
                 pin_memory: bool = False) -> None:
        self.sources, self.names = list(sources.values()), list(sources)
        self.block_size = block_size
        self.seed, self.rank, self.batch_size = seed, rank, batch_size
        self.pad_id, self.pin_memory = pad_id, pin_memory
        shares = np.asarray(weights, dtype=np.float64) / max(weights)  # (1e308 + 1e308: inf)
        self.bounds = np.cumsum(shares / shares.sum())
        self.bounds[-1] = 1.0  # a draw just below 1 never falls past the last source
        self.draws = 0
        self.blocks_drawn = [0] * len(self.sources)
        self._choices = KeyedDraws([seed, rank, len(self.sources)], self._chunk_of_sources)

    def sources_of(self, first: int, n: int) -> list[int]:
        """Which source draws first, ..., first + n - 1 read: the same on every run and
        every resume."""
        if len(self.sources) == 1:
            return [0] * n
        return self._choices.take(first, n)

    def _chunk_of_sources(self, seeds: np.random.SeedSequence) -> list[int]:
        uniform = np.random.Generator(np.random.PCG64(seeds)).random(KeyedDraws.CHUNK)
        return np.searchsorted(self.bounds, uniform, "right").tolist()

    def _next_batch(self) -> dict[str, torch.Tensor]:
        chosen = self.sources_of(self.draws, self.batch_size)
        blocks = [self.sources[i].next_block() for i in chosen]
        self.draws += len(chosen)  # (a step failing part-way is undone by `rollback_step`)
        for i in chosen:
            self.blocks_drawn[i] += 1
        batch = collate(blocks, self.batch_size, self.pad_id, self.sources[0].rows)
        if self.pin_memory:  # lets the copy to the GPU run without blocking the host
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch

    def report(self) -> tuple[dict[str, int], dict[str, float]]:
        """Per source, on this process: the token positions drawn from it (blocks x
        block_size), and the epochs of it trained on (those positions over the token
        positions of one epoch of this process's share: during a streamed source's first
        epoch, estimated from the pieces read so far)."""
        tokens = {name: drawn * self.block_size
                  for name, drawn in zip(self.names, self.blocks_drawn, strict=True)}
        epochs = {name: tokens[name] / source.epoch_tokens()
                  for name, source in zip(self.names, self.sources, strict=True)
                  if source.epoch_tokens()}
        return tokens, epochs

    @property
    def counters(self) -> dict[str, int]:
        """What the sources have read and tokenized, summed."""
        total: dict[str, int] = {}
        for source in self.sources:
            for key, value in source.counters.items():
                total[key] = total.get(key, 0) + value
        return total

    def _snapshot(self) -> tuple:
        return self.draws, list(self.blocks_drawn), [s._snapshot() for s in self.sources]

    def _restore(self, snapshot: tuple) -> None:
        self.draws, self.blocks_drawn, each = snapshot
        for source, state in zip(self.sources, each, strict=True):
            source._restore(state)

    def _position(self) -> dict[str, torch.Tensor]:
        position = {"data.mixture": torch.tensor([self.draws, *self.blocks_drawn],
                                                 dtype=torch.int64)}
        for name, source in zip(self.names, self.sources, strict=True):
            position.update({f"{name}/{k}": v for k, v in source._position().items()})
        return position

    def _load_position(self, state: dict[str, torch.Tensor]) -> None:
        saved = state.get("data.mixture")
        names = {key.split("/", 1)[0] for key in state if "/" in key}
        if saved is None or len(saved) != len(self.sources) + 1 or names != set(self.names):
            raise DataError(f"the checkpoint's data position is not of a mixture of the "
                            f"sources {', '.join(self.names)}")
        self.draws, *self.blocks_drawn = (int(v) for v in saved.tolist())
        for name, source in zip(self.names, self.sources, strict=True):
            prefix = f"{name}/"
            source.load_state_dict({k[len(prefix):]: v for k, v in state.items()
                                    if k.startswith(prefix)})

    def close(self) -> None:
        for source in self.sources:
            source.close()
