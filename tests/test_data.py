"""Streaming and packing invariants, on tiny data (torchtitan's packing tests are the model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hftrain.data import (
    IGNORE_INDEX,
    BlockShuffle,
    DataStreams,
    collate,
    pack_arrays,
    texts,
)
from hftrain.errors import DataError
from hftrain.recipe import DataConfig, TokenizerConfig
from hftrain.tokenizer import build_tokenizer

EOS = 0


def unpack(blocks: list[np.ndarray]) -> list[int]:
    """Blocks overlap by one token: the first block whole, then each next block minus its head."""
    stream = list(blocks[0])
    for block in blocks[1:]:
        assert block[0] == stream[-1], "consecutive blocks must share one token"
        stream.extend(block[1:])
    return [t for t in stream if t != IGNORE_INDEX]


def with_eos(docs: list[list[int]]) -> list[np.ndarray]:
    """Documents as the loader hands them to packing: ids with EOS appended."""
    return [np.append(np.asarray(doc, dtype=np.int64), EOS) for doc in docs]


@pytest.mark.parametrize("block_size", [1, 3, 7, 64])
def test_packing_keeps_every_token_once_in_order_with_eos_between_documents(block_size):
    rng = np.random.default_rng(block_size)
    docs = [list(rng.integers(1, 50, size=n)) for n in (0, 5, 17, 1, 30, 2)]
    expected = [t for doc in docs for t in [*doc, EOS]]
    blocks = list(pack_arrays(with_eos(docs), block_size, pad_tail=True))
    assert all(b.shape == (block_size + 1,) for b in blocks)
    assert unpack(blocks) == expected
    assert expected.count(EOS) == len(docs)


def test_packing_without_tail_holds_back_only_the_incomplete_block():
    docs = [list(range(1, 11))]  # 10 tokens + EOS = 11
    blocks = list(pack_arrays(with_eos(docs), 4))
    assert len(blocks) == 2  # 11 tokens hold (11 - 1) // 4 = 2 full blocks of 4 targets
    assert unpack(blocks) == [1, 2, 3, 4, 5, 6, 7, 8, 9]


def shuffled(n: int, capacity: int, seed: int) -> list[int]:
    buffer = BlockShuffle(capacity, seed, rank=0)
    out = [buffer.push(np.array([i])) for i in range(n)]
    return [int(b[0]) for b in out if b is not None]


def test_shuffle_buffer_is_seeded_and_emits_each_block_once():
    a, b, c = shuffled(100, 10, seed=1), shuffled(100, 10, seed=1), shuffled(100, 10, seed=2)
    assert len(a) == 90 and len(set(a)) == 90 and set(a) <= set(range(100))
    assert a == b and a != c and a != list(range(90))


def test_collate_shifts_targets_and_pads_missing_rows():
    blocks = [np.array([5, 6, 7, 8]), np.array([8, 9, IGNORE_INDEX, IGNORE_INDEX])]
    batch = collate(blocks, batch_size=3, pad_id=99)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 99], [99, 99, 99]]
    assert batch["labels"].tolist() == [[6, 7, 8], [9, -100, -100], [-100, -100, -100]]


def char_tokenizer(text: str):
    return build_tokenizer(TokenizerConfig(kind="char"), [text], 64)


def test_held_out_validation_is_exactly_the_last_fraction(corpus_file: Path,
                                                          shakespeare_text: str):
    tok = char_tokenizer(shakespeare_text)
    config = DataConfig(train_files=[str(corpus_file)], val_fraction=0.1, block_size=32)
    streams = DataStreams(config, tok, seed=0)
    batches = list(streams.val_batches(8))
    labels = [t for b in batches for t in b["labels"].flatten().tolist() if t != IGNORE_INDEX]
    cut = int(len(shakespeare_text) * 0.9)
    # Validation opens with the start token, so every token of the held-out text is a target
    # (the first one after the start token, as lm-eval scores it), then the closing EOS.
    assert batches[0]["input_ids"][0, 0] == tok.bos_token_id
    assert tok.decode(labels[:-1]) == shakespeare_text[cut:]
    assert labels[-1] == tok.eos_token_id
    scored_bytes = sum(int(b["byte_counts"][b["labels"] != IGNORE_INDEX].sum()) for b in batches)
    assert scored_bytes == len(shakespeare_text[cut:].encode())
    assert next(texts(config, "train")) == shakespeare_text[:cut]


def test_train_batches_have_fixed_shape_and_repeat_epochs(corpus_file: Path,
                                                          shakespeare_text: str):
    tok = char_tokenizer(shakespeare_text)
    config = DataConfig(train_files=[str(corpus_file)], block_size=64, shuffle_tokens=0)
    batches = DataStreams(config, tok, seed=0).train_batches(batch_size=16)
    n_blocks_per_epoch = int(len(shakespeare_text) * 0.9) // 64
    for _ in range(2 * n_blocks_per_epoch // 16 + 2):  # more than two epochs
        batch = next(batches)
        assert batch["input_ids"].shape == batch["labels"].shape == (16, 64)
        assert (batch["labels"] != IGNORE_INDEX).all()


def test_json_lines_and_parquet_sources_read_the_text_column(tmp_path: Path):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = ["first document", "second one", "third"]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": docs}), parquet)
    tok = char_tokenizer("".join(docs))
    for path in (jsonl, parquet):
        config = DataConfig(train_files=[str(path)], text_column="body", val_fraction=0.0,
                            val_files=[str(path)], block_size=4)
        labels = [t for b in DataStreams(config, tok, seed=0).val_batches(4)
                  for t in b["labels"].flatten().tolist() if t != IGNORE_INDEX]
        # every document after the start token (the previous one's EOS), all scored
        expected = [t for d in docs for t in [*tok(d).input_ids, tok.eos_token_id]]
        assert labels == expected, path.suffix


def test_bad_sources_name_the_culprit(tmp_path: Path, corpus_file: Path, shakespeare_text: str):
    tok = char_tokenizer(shakespeare_text)
    missing = tmp_path / "missing.txt"
    with pytest.raises(DataError, match=f"data file not found: {missing}"):
        next(DataStreams(DataConfig(train_files=[str(missing)]), tok, 0).train_batches(2))
    with pytest.raises(DataError, match="no file matches"):
        next(DataStreams(DataConfig(train_files=[str(tmp_path / "*.md")]), tok, 0)
             .train_batches(2))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match=f"training corpus is empty: {empty}"):
        next(DataStreams(DataConfig(train_files=[str(empty)]), tok, 0).train_batches(2))
    with pytest.raises(DataError, match="fewer than data.block_size"):
        config = DataConfig(train_files=[str(corpus_file)], block_size=100_000)
        next(DataStreams(config, tok, 0).train_batches(2))
    with pytest.raises(DataError, match="x.jsonl line 1: no 'content' field"):
        jsonl = tmp_path / "x.jsonl"
        jsonl.write_text('{"text": "abc"}\n')
        next(DataStreams(DataConfig(train_files=[str(jsonl)], text_column="content"), tok, 0)
             .train_batches(2))


@pytest.mark.parametrize("budget", [256 << 20, 0])
def test_evaluations_tokenize_validation_once_within_the_memory_budget(tmp_path, budget,
                                                                       monkeypatch):
    """The second evaluation reads the validation pieces the first tokenized (with offsets,
    the slow path) and gets the same batches; with no budget left, it tokenizes again. A
    validation file changed since is refused all the same, kept tokens or not."""
    import torch

    from hftrain.data import KeptTokens
    from hftrain.data.loader import PieceTokenizer

    text = "".join(f"Line {i}: to be or not to be.\n\n" for i in range(400))
    (tmp_path / "train.txt").write_text(text)
    (tmp_path / "val.txt").write_text(text[::-1])
    config = DataConfig(train_files=[str(tmp_path / "train.txt")],
                        val_files=[str(tmp_path / "val.txt")], block_size=16, num_workers=0,
                        sample_by="paragraph")
    tok = build_tokenizer(TokenizerConfig(kind="char"), [text], 16)
    streams = DataStreams(config, tok, seed=0)
    streams.val_kept = KeptTokens(budget=budget)
    tokenized = []
    real = PieceTokenizer._tokenized
    monkeypatch.setattr(PieceTokenizer, "_tokenized",
                        lambda self, i: tokenized.append(i) or real(self, i))
    first = list(streams.val_batches(8))
    pieces = len(tokenized)
    second = list(streams.val_batches(8))
    assert pieces > 0 and len(tokenized) == (pieces if budget else 2 * pieces)
    assert len(first) == len(second) > 1
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, second, strict=True) for k in a)
    (tmp_path / "val.txt").write_text(text[::-1] + "one more line\n")
    with pytest.raises(DataError, match="val.txt"):
        next(streams.val_batches(8))
