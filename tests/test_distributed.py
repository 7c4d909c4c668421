"""Data parallel on CPU: ranks read disjoint data that together is the 1-process stream, and
`torchrun --nproc_per_node 2` with batch B/2 trains like one process with batch B."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, tiny_recipe_dict

from hftrain.data import DataStreams
from hftrain.recipe import DataConfig, TokenizerConfig, recipe_from_dict
from hftrain.tokenizer import build_tokenizer
from hftrain.tracking import read_metrics
from hftrain.train import train


def rows(batches, n: int) -> list[tuple[int, ...]]:
    return [tuple(r) for _ in range(n) for r in next(batches)["input_ids"].tolist()]


@pytest.mark.parametrize("stateful", [False, True])
def test_ranks_read_disjoint_data_that_covers_the_single_process_stream(corpus_file,
                                                                        shakespeare_text,
                                                                        stateful):
    tok = build_tokenizer(TokenizerConfig(kind="char"), [shakespeare_text], 16)
    config = DataConfig(train_files=[str(corpus_file)], block_size=16, shuffle_buffer=50)
    single = DataStreams(config, tok, seed=3, stateful=stateful).train_batches(8)
    ranks = [DataStreams(config, tok, seed=3, stateful=stateful, rank=r, world_size=2)
             .train_batches(4) for r in range(2)]
    for _ in range(5):  # five steps: the global batch of step k is the single batch of step k
        whole = rows(single, 1)
        parts = [rows(ranks[r], 1) for r in range(2)]
        assert not set(parts[0]) & set(parts[1])
        assert sorted(parts[0] + parts[1]) == sorted(whole)


def test_sharded_sources_are_split_by_file(tmp_path, shakespeare_text):
    files = []
    for i in range(4):
        path = tmp_path / f"part{i}.txt"
        path.write_text(shakespeare_text[i * 4000:(i + 1) * 4000])
        files.append(str(path))
    tok = build_tokenizer(TokenizerConfig(kind="char"), [shakespeare_text], 16)
    config = DataConfig(train_files=files, val_files=files, block_size=16)
    seen = []
    for rank in range(2):
        streams = DataStreams(config, tok, seed=0, rank=rank, world_size=2)
        ds, by_shard = streams._source("val")
        assert by_shard and ds.n_shards == 2
        seen.append({row["text"][:30] for row in ds})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 4


@pytest.mark.parametrize("model", ["gpt2", "stateful_lstm"])
def test_torchrun_two_processes_match_one(tmp_path, corpus_file, model):
    if shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists():
        pytest.skip("torchrun not installed")
    data = tiny_recipe_dict(corpus_file, tmp_path / "one", train={"max_steps": 20},
                            eval={"interval": 10, "max_batches": 2})
    if model == "stateful_lstm":
        data["model"] = {"arch": "lstm", "embedding_size": 32, "hidden_size": 32,
                         "num_layers": 1, "dropout": 0.0, "output_dropout": 0.0}
        data["train"]["stateful"] = True
        data["eval"] = {"interval": 10, "batch_size": 4}
    one = train(recipe_from_dict(data))
    data["run"]["output_dir"] = str(tmp_path / "two")
    data["train"]["batch_size"] //= 2  # batch sizes are per process
    data["eval"]["batch_size"] //= 2  # (stateful evaluation: its lanes are, too)
    recipe = tmp_path / "two.yaml"
    recipe.write_text(json.dumps(data))
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "hftrain", "train",
                           str(recipe)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = read_metrics(one.run_dir / "metrics.jsonl")
    b = read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r.keys() for r in a] == [r.keys() for r in b]
    for x, y in zip(a, b, strict=True):
        assert x["step"] == y["step"]
        if "loss" in x:
            assert y["loss"] == pytest.approx(x["loss"], rel=1e-4)
            assert y["tokens"] == x["tokens"]
        else:
            assert y["val_tokens"] == x["val_tokens"]
            assert y["val_loss"] == pytest.approx(x["val_loss"], rel=1e-4)
