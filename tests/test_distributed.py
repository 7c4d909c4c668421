"""Data parallel on CPU (issue 11): each rank reads and tokenizes its own pieces of the data
(disjoint, together every piece once per epoch); N stateful processes with batch B/N, and N
processes reading a token cache, train on exactly the batches of one process with batch B;
`torchrun --nproc_per_node 2` runs the recipe either way."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, blocks_of, run_or_dump, tiny_recipe_dict, unpack

from hftrain.cli import main
from hftrain.data import DataStreams
from hftrain.data.cache import prepare
from hftrain.recipe import DataConfig, TokenizerConfig, recipe_from_dict
from hftrain.tokenizer import build_tokenizer
from hftrain.tracking import read_metrics
from hftrain.train import train


@pytest.fixture(scope="module")
def tok(shakespeare_text):
    return build_tokenizer(TokenizerConfig(kind="char"), [shakespeare_text], 16)


def line_documents(text: str) -> list[str]:
    """What `sample_by: line` makes of a text: every line, empty ones included."""
    return text[:-1].split("\n") if text.endswith("\n") else text.split("\n")


def tokens_of(tok, documents: list[str]) -> list[int]:
    return [t for doc in documents for t in [*tok(doc).input_ids, tok.eos_token_id]]


def piece_text(piece) -> str:
    with open(piece.path, "rb") as f:
        f.seek(piece.start)
        return f.read(piece.end - piece.start).decode("utf-8")


def write_shards(tmp_path: Path, text: str, n: int) -> list[str]:
    size = math.ceil(len(text) / n)
    files = []
    for i in range(n):
        path = tmp_path / f"shard{i}.txt"
        path.write_text(text[i * size:(i + 1) * size], encoding="utf-8")
        files.append(str(path))
    return files


@pytest.mark.parametrize("world_size, share", [(2, 0.6), (3, 0.4)])
@pytest.mark.parametrize("layout", ["one_file", "8_shards"])
def test_each_rank_tokenizes_its_own_share_and_the_ranks_cover_every_piece(
        tmp_path, corpus_file, shakespeare_text, tok, layout, world_size, share):
    files = [str(corpus_file)] if layout == "one_file" else write_shards(tmp_path,
                                                                          shakespeare_text, 8)
    config = DataConfig(train_files=files, sample_by="line", val_fraction=0.0, block_size=16,
                        shuffle_tokens=0, num_workers=0)
    documents = [d for f in files for d in line_documents(Path(f).read_text(encoding="utf-8"))]
    total_documents, total_tokens = len(documents), len(tokens_of(tok, documents))

    counters, read = [], []
    for rank in range(world_size):
        stream = DataStreams(config, tok, seed=0, rank=rank, world_size=world_size) \
            .train_batches(2)
        blocks: list[list[int]] = []
        while stream.epoch == 0:  # the epoch ends when the rank takes its last piece
            blocks += blocks_of(next(stream))
        counters.append(dict(stream.counters))  # what this rank tokenized in one epoch
        pieces = [stream.pieces.pieces[i] for i in stream.order.epoch(0)]
        read.append(pieces)
        expected = [t for p in pieces for t in tokens_of(tok, line_documents(piece_text(p)))]
        while len(blocks) * 16 + 1 < len(expected) + 40:  # into the next epoch
            blocks += blocks_of(next(stream))
        got = unpack(blocks)
        # This rank's blocks are exactly its pieces' tokens, in order, after the start token
        # (then the next epoch).
        assert got == [tok.bos_token_id, *expected * 2][:len(got)]
        stream.close()

    for c in counters:
        assert c["documents"] <= share * total_documents, (counters, total_documents)
        assert c["tokens"] <= share * total_tokens, (counters, total_tokens)
    assert sum(c["documents"] for c in counters) == total_documents
    assert sum(c["tokens"] for c in counters) == total_tokens
    # The ranks' pieces are disjoint and together tile every file, byte for byte.
    every = sorted((p.path, p.start, p.end) for pieces in read for p in pieces)
    assert len(set(every)) == len(every)
    for path in files:
        ranges = [(a, b) for f, a, b in every if f == path]
        assert ranges[0][0] == 0 and ranges[-1][1] == Path(path).stat().st_size
        assert all(b == a2 for (_, b), (a2, _) in zip(ranges, ranges[1:], strict=False))


def rows(batch: dict) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    return list(zip(map(tuple, batch["input_ids"].tolist()), map(tuple, batch["labels"].tolist()),
                    strict=True))


@pytest.mark.parametrize("world_size", [2, 3])
def test_stateful_ranks_together_see_the_lanes_of_one_process(corpus_file, tok, world_size):
    config = DataConfig(train_files=[str(corpus_file)], block_size=16, shuffle_tokens=1024)
    batch = 6
    single = DataStreams(config, tok, seed=3, stateful=True).train_batches(batch)
    ranks = [DataStreams(config, tok, seed=3, stateful=True, rank=r, world_size=world_size)
             .train_batches(batch // world_size) for r in range(world_size)]
    epochs_started = 0
    for _ in range(1000):  # until a few windows into the second epoch
        whole = next(single)
        parts = [next(r) for r in ranks]
        for key in ("input_ids", "labels"):  # rank r holds lanes r*B/N .. (r+1)*B/N - 1
            assert torch.equal(torch.cat([p[key] for p in parts]), whole[key])
        assert all(p["reset_state"] == whole["reset_state"] for p in parts)
        epochs_started += whole["reset_state"]
        if epochs_started == 2 and not whole["reset_state"]:
            break
    assert epochs_started == 2


def test_ranks_reading_a_token_cache_together_see_the_blocks_of_one_process(
        tmp_path, corpus_file, tok):
    config = DataConfig(train_files=[str(corpus_file)], block_size=16, shuffle_tokens=1024,
                        cache=str(tmp_path / "cache"))
    prepare(config, tok, show_progress=False)
    batch = 8
    single = DataStreams(config, tok, seed=5).train_batches(batch)
    ranks = [DataStreams(config, tok, seed=5, rank=r, world_size=2).train_batches(batch // 2)
             for r in range(2)]
    for _ in range(single.n_blocks // batch):  # the first epoch
        whole = rows(next(single))
        parts = [rows(next(r)) for r in ranks]
        assert sorted(parts[0] + parts[1]) == sorted(whole)  # step k: the same global batch


def run_two_processes(tmp_path: Path, data: dict) -> Path:
    data = json.loads(json.dumps(data))
    data["run"]["output_dir"] = str(tmp_path / "two")
    data["train"]["batch_size"] //= 2  # batch sizes are per process
    data["eval"]["batch_size"] //= 2  # (stateful evaluation: its lanes are, too)
    recipe = tmp_path / "two.yaml"
    recipe.write_text(json.dumps(data))
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    proc = run_or_dump([torchrun, "--nproc_per_node", "2", "-m", "hftrain", "train",
                        str(recipe)], 600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tmp_path / "two"


# the token cache on 2 processes runs by default in test_sharded.py; here with -m slow
@pytest.mark.parametrize("model", [pytest.param("gpt2_cache", marks=pytest.mark.slow),
                                   "stateful_lstm", "gpt2_streaming"])
def test_torchrun_two_processes_and_one(tmp_path, corpus_file, model):
    """Cached and stateful: 2 processes with batch B/2 train exactly as 1 process with batch B.
    Streaming: the ranks read disjoint pieces, so the batches differ; the run is the same
    length, counts the same tokens and reaches a similar validation loss."""
    if shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists():
        pytest.skip("torchrun not installed")
    data = tiny_recipe_dict(corpus_file, tmp_path / "one", train={"max_steps": 20},
                            eval={"interval": 10, "max_batches": 2})
    if model == "stateful_lstm":
        data["model"] = {"arch": "lstm", "embedding_size": 32, "hidden_size": 32,
                         "num_layers": 1, "dropout": 0.0, "output_dropout": 0.0}
        data["train"]["stateful"] = True
        data["eval"] = {"interval": 10, "batch_size": 4}
    if model == "gpt2_cache":  # prepared first, as a user would: both runs read it
        data["data"]["cache"] = str(tmp_path / "cache")
        recipe = tmp_path / "one.yaml"
        recipe.write_text(json.dumps(data))
        main(["prepare", str(recipe)])
    one = train(recipe_from_dict(data))
    two = run_two_processes(tmp_path, data)
    a = read_metrics(one.run_dir / "metrics.jsonl")
    b = read_metrics(two / "metrics.jsonl")
    assert [r.keys() for r in a] == [r.keys() for r in b]
    exact = model != "gpt2_streaming"
    for x, y in zip(a, b, strict=True):
        assert x["step"] == y["step"]
        if "loss" in x:
            assert y["tokens"] == x["tokens"]
            if exact:
                assert y["loss"] == pytest.approx(x["loss"], rel=1e-4)
        else:
            assert np.isfinite(y["val_loss"])
            if exact:
                assert y["val_loss"] == pytest.approx(x["val_loss"], rel=1e-4)
            else:
                assert y["val_loss"] == pytest.approx(x["val_loss"], rel=0.1)
            # validation scores every token but the first of each rank's first piece (the
            # in-training evaluations read a capped number of batches: equal counts)
            assert x["val_tokens"] - y["val_tokens"] in ((0,) if exact else (0, 1))
    assert (two / "final" / "config.json").is_file()
