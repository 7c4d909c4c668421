"""A token cache: a corpus tokenized once, in parallel, into memory-mapped token files.

For corpora read many times (several epochs, several runs on one local corpus), tokenizing
on every pass wastes most of the data pipeline's CPU. `hftrain prepare RECIPE` (or the first
run whose recipe sets `data.cache: FOLDER`) writes, per split, `<split>.bin` (the token
stream: documents end to end, framed as `hftrain.framing` says, as uint16 or uint32) and
`<split>.documents.npy` (where each document ends), `val.bytes.bin` (the UTF-8 bytes each
validation token stands for, uint32, for bits per byte) and `hftrain_cache.json` recording
what the tokens were made from. Training then reads blocks straight from the memory map
(nanoGPT's and Megatron's layout): block i of an epoch is `tokens[b*B : b*B + B + 1]` for the
i-th entry b of a seeded permutation, rank r takes entries r, r + N, ..., so the rank split
is exact and the position is (epoch, i), restored in O(1).

A cache is used only if it was made from the same files (size and mtime), data settings and
tokenizer; otherwise it is rebuilt in place (hftrain replaces only folders it wrote itself).
Records (`data.kind: sft`, `preference`) are not cached: their labels need the records.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from hftrain.atomic import atomic_directory, atomic_write_text, write_error_reason
from hftrain.checkpoint import file_sha256
from hftrain.data.batches import TrainBatches
from hftrain.data.loader import (
    PieceTokenizer,
    lane_val_batches,
    piece_loader,
)
from hftrain.data.packing import collate
from hftrain.data.sources import SplitPieces
from hftrain.errors import DataError, HftrainError
from hftrain.framing import Framing
from hftrain.nodes import PROBE_PREFIX
from hftrain.recipe import DataConfig

CACHE_RECORD = "hftrain_cache.json"
CACHE_FILES = {CACHE_RECORD, "train.bin", "val.bin", "train.documents.npy",
               "val.documents.npy", "val.bytes.bin"}
FORMAT = 2
"""2: documents framed by a start token; validation bytes per token."""
_SETTINGS = ("train_files", "val_files", "val_fraction", "dataset", "dataset_config",
             "train_split", "val_split", "format", "text_column", "sample_by")


def identity(config: DataConfig, tokenizer: Any) -> dict[str, Any]:
    """What the cached tokens depend on: the data settings, each file's size and mtime, and
    the tokenizer (its full JSON)."""
    files: dict[str, list[int]] = {}
    for split in _splits(config):
        for path, fp in SplitPieces(config, split).fingerprints.items():
            files[str(Path(path).resolve())] = list(fp)
    backend = tokenizer.backend_tokenizer.to_str()
    return {"format": FORMAT, "settings": {k: getattr(config, k) for k in _SETTINGS},
            "files": files, "eos_id": tokenizer.eos_token_id,
            "start_id": Framing.of(tokenizer).start,
            "tokenizer_sha256": hashlib.sha256(backend.encode()).hexdigest()}


def check_cacheable(config: DataConfig) -> None:
    if config.kind != "text":
        raise DataError(f"data.cache holds text tokens; records (data.kind: {config.kind}) "
                        "are streamed: remove data.cache")


def prepare(config: DataConfig, tokenizer: Any, show_progress: bool = True) -> Path:
    """Make sure `config.cache` holds this corpus, tokenized; build it if not. Returns it."""
    check_cacheable(config)
    folder = Path(config.cache).expanduser()
    wanted = identity(config, tokenizer)
    record = read_record(folder)
    if record is not None and record.get("identity") == wanted and _intact(folder, record):
        return folder
    _refuse_foreign(folder, record)  # before the lock file is made beside a folder not ours
    try:
        with _builder_lock(folder):  # two runs starting on one new cache: one builds it
            record = read_record(folder)
            same = record is not None and record.get("identity") == wanted
            if same and _intact(folder, record, warn=True):
                return folder  # the other process built it while this one waited
            _check_and_build(config, tokenizer, folder, wanted, record, show_progress,
                             announce=not same)  # altered after it was built: said above
    except OSError as exc:  # a read-only or missing parent folder, a full disk
        raise HftrainError(f"could not write the token cache {folder} "
                           f"({write_error_reason(exc)})") from None
    return folder


@contextmanager
def _builder_lock(folder: Path) -> Iterator[None]:
    """An exclusive `flock` on `.NAME.lock` beside the cache (the folder itself is replaced
    whole, so the lock cannot live inside it); a second builder waits, saying so."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(f".{folder.name}.lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"hftrain: waiting for another process building the token cache {folder}",
                  file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def check_target(config: DataConfig) -> None:
    """Refuse, before anything is written, a `data.cache` that is a file or a folder of
    someone else's."""
    check_cacheable(config)
    folder = Path(config.cache).expanduser()
    _refuse_foreign(folder, read_record(folder))


def _refuse_foreign(folder: Path, record: dict[str, Any] | None) -> None:
    if folder.exists() and not folder.is_dir():
        raise DataError(f"data.cache {folder} is a file; point data.cache at a folder")
    under_file = next((p for p in folder.parents if p.exists() and not p.is_dir()), None)
    if under_file is not None:
        raise DataError(f"data.cache {folder} is under {under_file}, which is a file")
    if folder.exists() and record is None and any(_not_probes(folder)):
        raise DataError(f"data.cache {folder} is a folder hftrain did not write (it has no "
                        f"{CACHE_RECORD}); point data.cache at a new or empty folder")


def _not_probes(folder: Path) -> list[Path]:
    """The folder's entries but the probe files a killed run of several nodes left behind."""
    return [p for p in folder.iterdir() if not p.name.startswith(PROBE_PREFIX)]


def _check_and_build(config: DataConfig, tokenizer: Any, folder: Path, wanted: dict[str, Any],
                     record: dict[str, Any] | None, show_progress: bool,
                     announce: bool = True) -> None:
    _refuse_foreign(folder, record)
    foreign = sorted(p.name for p in _not_probes(folder) if p.name not in CACHE_FILES) \
        if folder.is_dir() else []
    if foreign:  # a rebuild replaces the folder: never with files hftrain did not write
        raise DataError(f"data.cache {folder} must be rebuilt (its data, settings or tokenizer "
                        f"changed) but also holds {', '.join(foreign)}; move those away first")
    if record is not None and announce:
        print(f"hftrain: {folder} was tokenized from other files, settings or tokenizer: "
              "rebuilding it", file=sys.stderr)
    _build(config, tokenizer, folder, wanted, show_progress)


def _intact(folder: Path, record: dict[str, Any], warn: bool = False) -> bool:
    """Whether every split's tokens still have the SHA-256 they were built with (a cache
    built before the record held one is taken as it is). An edit in place at the same size
    and mtime, or a flipped byte that makes an out-of-range id, would otherwise be trained
    on. One read of the cache per start, by the one process per filesystem that builds it."""
    for split, entry in (record.get("splits") or {}).items():
        expected = entry.get("sha256") if isinstance(entry, dict) else None
        if expected is None:
            continue
        try:
            actual = file_sha256(folder / f"{split}.bin")
        except OSError:
            actual = None
        if actual != expected:
            if warn:
                print(f"hftrain: {folder / f'{split}.bin'} changed after it was built (its "
                      "SHA-256 differs): rebuilding the token cache", file=sys.stderr)
            return False
    return True


def split_digests(folder: Path) -> dict[str, Any]:
    """Each split's token and document counts and the SHA-256 of its tokens: what nodes that
    each built their own cache compare. A cache built before its record held the digest is
    hashed now."""
    record = read_record(folder) or {}
    splits = record.get("splits") or {}
    missing = [split for split, entry in splits.items() if "sha256" not in entry]
    for split in missing:
        try:
            splits[split]["sha256"] = file_sha256(folder / f"{split}.bin")
        except OSError as exc:
            raise HftrainError(f"cannot read the token cache {folder / f'{split}.bin'} "
                               f"({write_error_reason(exc)})") from None
    if missing:  # hashed once: kept in the record if the folder can be written
        with suppress(OSError):
            atomic_write_text(folder / CACHE_RECORD, json.dumps(record, indent=2))
    return splits


def read_record(folder: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((folder / CACHE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _build(config: DataConfig, tokenizer: Any, folder: Path, wanted: dict[str, Any],
           show_progress: bool) -> None:
    dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32
    splits: dict[str, dict[str, int]] = {}
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(folder) as tmp:
        for split in _splits(config):
            splits[split] = _write_split(config, tokenizer, split, tmp, dtype, show_progress)
        record = {"identity": wanted, "dtype": np.dtype(dtype).name, "splits": splits}
        (tmp / CACHE_RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")


def _write_split(config: DataConfig, tokenizer: Any, split: str, folder: Path, dtype: Any,
                 show_progress: bool) -> dict[str, Any]:
    """`<split>.bin`, `<split>.documents.npy` and (validation) `val.bytes.bin`; returns the
    split's token and document counts and the SHA-256 of its tokens."""
    pieces = SplitPieces(config, split)
    tokenize = PieceTokenizer(pieces, tokenizer, with_bytes=split == "val")
    loader = piece_loader(tokenize, range(len(pieces.pieces)),
                          min(max(config.num_workers, 1), len(pieces.pieces)))
    opening = tokenize.opening(0)
    n_tokens, ends = opening.shape[-1], []
    with ExitStack() as files:
        out = files.enter_context(open(folder / f"{split}.bin", "wb"))
        out_bytes = files.enter_context(open(folder / "val.bytes.bin", "wb")) \
            if tokenize.with_bytes else None
        bar = files.enter_context(tqdm(total=len(pieces.pieces), desc=f"tokenize {split}",
                                       unit="piece", disable=not show_progress))

        digest = hashlib.sha256()  # nodes that each build their own cache compare it

        def write(tokens: np.ndarray) -> None:
            stream = (tokens[0] if out_bytes is not None else tokens).astype(dtype).tobytes()
            out.write(stream)
            digest.update(stream)
            if out_bytes is not None:
                out_bytes.write(tokens[1].astype(np.uint32).tobytes())

        write(opening)
        for item in loader:
            item = item.checked()
            write(item.tokens)
            ends.append(n_tokens + np.cumsum(item.lengths))
            n_tokens += item.tokens.shape[-1]
            bar.update(1)
    np.save(folder / f"{split}.documents.npy",
            np.concatenate(ends) if ends else np.empty(0, dtype=np.int64))
    return {"tokens": n_tokens, "documents": int(sum(len(e) for e in ends)),
            "sha256": digest.hexdigest()}


def _splits(config: DataConfig) -> list[str]:
    return ["train"] + (["val"] if config.val_files or config.val_fraction > 0 else [])


def open_for(config: DataConfig, tokenizer: Any) -> TokenCache:
    """The cache `config.cache` names, which must match the recipe's data and tokenizer
    (`prepare` makes sure it does)."""
    check_cacheable(config)
    folder = Path(config.cache).expanduser()
    record = read_record(folder)
    if record is None or record.get("identity") != identity(config, tokenizer):
        raise DataError(f"data.cache {folder} does not hold this recipe's data tokenized with "
                        f"its tokenizer; run: hftrain prepare RECIPE")
    return TokenCache(folder, record, config, tokenizer.pad_token_id)


class TokenCache:
    """A prepared cache's token streams, as training and validation batches."""

    def __init__(self, folder: Path, record: dict[str, Any], config: DataConfig,
                 pad_id: int) -> None:
        self.folder, self.record, self.config, self.pad_id = folder, record, config, pad_id
        # opened once: a later rebuild of the folder (another recipe's prepare) replaces the
        # files, and a run keeps reading the ones it started with
        self._tokens = {split: self._open(split) for split in record["splits"]}
        if "val" in record["splits"]:
            self._val_bytes = self._open("val", "val.bytes.bin", np.uint32)

    def _open(self, split: str, name: str | None = None, dtype: Any = None) -> np.ndarray:
        """A split's tokens (or, by `name`, another array of one entry per token)."""
        path = self.folder / (name or f"{split}.bin")
        expected = self.record["splits"][split]["tokens"]
        dtype = np.dtype(dtype or self.record["dtype"])
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise HftrainError(f"cannot read the token cache {path}: {exc.strerror}") from None
        if size != expected * dtype.itemsize:
            raise DataError(f"the token cache {path} has {size:,} bytes, {expected:,} tokens "
                            f"({expected * dtype.itemsize:,} bytes) were written: it is "
                            f"damaged; delete {self.folder} and run hftrain prepare again")
        if expected == 0:
            return np.empty(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    def tokens(self, split: str) -> np.ndarray:
        if split not in self._tokens:
            raise DataError(f"no validation data in {self.folder}: set data.val_files or "
                            "data.val_fraction > 0 and run hftrain prepare again")
        return self._tokens[split]

    def train_stream(self, batch_size: int, seed: int, rank: int, world_size: int,
                     stateful: bool, pin_memory: bool) -> Any:
        tokens = self.tokens("train")
        if stateful:
            from hftrain.data.loader import LaneStream

            return LaneStream(lambda: np.asarray(tokens, dtype=np.int64), str(self.folder),
                              {}, self.config, batch_size, rank, world_size, self.pad_id)
        return CachedStream(tokens, self.config, seed, batch_size, rank, world_size,
                            pin_memory, self.pad_id, str(self.folder))

    def val_batches(self, batch_size: int, rank: int, world_size: int,
                    stateful: bool) -> Iterator[dict[str, Any]]:
        ids = self.tokens("val")
        block, pad_id = self.config.block_size, self.pad_id
        if stateful:
            tokens = np.stack([np.asarray(ids, np.int64), np.asarray(self._val_bytes, np.int64)])
            yield from lane_val_batches(tokens, batch_size, rank, world_size, block, pad_id)
            return
        n_blocks = -(-(len(ids) - 1) // block) if len(ids) > 1 else 0
        mine = list(range(rank, n_blocks, world_size))
        for start in range(0, len(mine), batch_size):
            rows = [np.stack([_padded(ids, b * block, block + 1),
                              _padded(self._val_bytes, b * block, block + 1)])
                    for b in mine[start : start + batch_size]]
            yield collate(rows, batch_size, pad_id, ("ids", "bytes"))


def _padded(tokens: np.ndarray, start: int, width: int) -> np.ndarray:
    from hftrain.sft import IGNORE_INDEX

    row = np.asarray(tokens[start : start + width], dtype=np.int64)
    if len(row) < width:
        row = np.concatenate([row, np.full(width - len(row), IGNORE_INDEX, dtype=np.int64)])
    return row


class CachedStream(TrainBatches):
    """Training batches from a token cache: the blocks of each epoch in a seeded permutation
    (stream order without shuffling), every N-th to rank r. Position: (epoch, index).

    Each epoch drops its last (n_blocks mod N) entries so that every rank's epoch has the same
    length; then the N ranks' batches of step k, each of B/N blocks, are exactly the B blocks
    one process with batch B reads at step k (within the first epoch, or in every epoch when
    n_blocks divides by N)."""

    def __init__(self, tokens: np.ndarray, config: DataConfig, seed: int, batch_size: int,
                 rank: int, world_size: int, pin_memory: bool, pad_id: int, name: str) -> None:
        self.tokens, self.config, self.seed = tokens, config, seed
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.pin_memory, self.pad_id = pin_memory, pad_id
        self.n_blocks = (len(tokens) - 1) // config.block_size if len(tokens) > 1 else 0
        if self.n_blocks < world_size:
            raise DataError(f"the token cache {name} holds {len(tokens)} tokens, fewer than "
                            f"one block of data.block_size + 1 = {config.block_size + 1} "
                            f"for each of the {world_size} processes; lower data.block_size")
        self.epoch = self.index = 0
        self._order: tuple[int, np.ndarray] | None = None
        self.counters = {"pieces": 0, "documents": 0, "tokens": 0}

    def _epoch_blocks(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            order = np.arange(self.n_blocks)
            if self.config.shuffle_tokens > 0:
                order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_blocks)
            usable = self.n_blocks - self.n_blocks % self.world_size  # equal shares: ranks
            self._order = self.epoch, order[:usable][self.rank :: self.world_size]  # wrap together
        return self._order[1]

    rows = ("ids",)

    def next_block(self) -> np.ndarray:
        """The next block of this rank's share of the epoch's order."""
        blocks = self._epoch_blocks()
        if self.index >= len(blocks):  # (>: resumed on fewer processes at an epoch's end)
            self.epoch, self.index = self.epoch + 1, 0
            blocks = self._epoch_blocks()
        start = int(blocks[self.index]) * self.config.block_size
        width = self.config.block_size + 1
        self.index += 1
        self.counters["tokens"] += width
        return np.asarray(self.tokens[start : start + width], dtype=np.int64)

    def epoch_tokens(self) -> int:
        """Token positions in this rank's share of an epoch."""
        return len(self._epoch_blocks()) * self.config.block_size

    def _next_batch(self) -> dict[str, torch.Tensor]:
        rows = [self.next_block() for _ in range(self.batch_size)]
        batch = collate(rows, self.batch_size, self.pad_id)
        if self.pin_memory:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch

    def _snapshot(self) -> tuple:
        return self.epoch, self.index, dict(self.counters)

    def _restore(self, snapshot: tuple) -> None:
        self.epoch, self.index, self.counters = snapshot

    def _position(self) -> dict[str, torch.Tensor]:
        position = [self.epoch, self.index, self.n_blocks, self.world_size]
        return {"data.position": torch.tensor(position, dtype=torch.int64)}

    def _load_position(self, state: dict[str, torch.Tensor]) -> None:
        """Continue where the checkpoint's ranks stopped, on as many processes as now: the
        N ranks together had read `index x N` entries of the epoch's order, and this rank of
        M continues at its share of them (the global batch is the same, so M divides them)."""
        position = [int(v) for v in state["data.position"].tolist()]
        epoch, index, n_blocks = position[:3]
        saved_world = position[3] if len(position) > 3 else self.world_size  # before issue 19
        if n_blocks != self.n_blocks:
            raise DataError(f"the token cache holds {self.n_blocks} blocks now, {n_blocks} "
                            "when the checkpoint was saved; it was rebuilt from other data")
        read = index * saved_world
        if read % self.world_size:
            raise DataError(f"the checkpoint's {saved_world} processes had read {read} blocks "
                            f"of epoch {epoch}, which {self.world_size} processes cannot share")
        self.epoch, self.index = epoch, read // self.world_size
