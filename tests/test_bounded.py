"""Bounded resources (issue 20, S15): a typo in a size, a small recipe of YAML aliases or a
large file without line breaks never takes the machine down: sizes that cannot fit are
refused in one line before anything large is allocated, YAML expansion is bounded, and a
file of one long line is read in bounded pieces with the tokens of the whole line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import blocks_of, cli, tiny_recipe_dict, unpack

import hftrain.data.sources as sources
from hftrain.data import DataStreams
from hftrain.data.sources import SplitPieces
from hftrain.errors import RecipeError
from hftrain.memory import model_sizes
from hftrain.recipe import DataConfig, TokenizerConfig, load_recipe
from hftrain.tokenizer import build_tokenizer
from hftrain.tracking import read_metrics
from hftrain.yaml_data import MAX_VALUES

REPO = Path(__file__).resolve().parents[1]


def alias_bomb(levels: int) -> str:
    """`levels` lists of ten aliases of the one before: 10**levels values in a few lines."""
    lines = ['  a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "sample:\n  prompt:\n" + "\n".join("  " + line for line in lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_in_one_line(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(9) + "run:\n  name: *a8\n")  # 10**9 values in 600 bytes
    with pytest.raises(RecipeError) as refused:
        load_recipe(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: not valid YAML: it expands to more than")
    assert "\n" not in message and len(message) < 300


def test_an_alias_bomb_in_an_override_and_deep_nesting_are_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  max_steps: 1\n")
    bomb = "[" + ", ".join(["&a [x, x, x, x, x, x, x, x, x, x]"] + ["*a"] * (MAX_VALUES // 10))
    with pytest.raises(RecipeError, match="expands to more than"):
        load_recipe(path, ["run.name=" + bomb + "]"])
    path.write_text("run:\n  name: " + "[" * 20_000 + "]" * 20_000 + "\n")
    with pytest.raises(RecipeError, match="nests lists or mappings too deeply"):
        load_recipe(path)


def test_aliases_within_the_bound_still_work(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  train_files: &files [a.txt, b.txt]\n  val_files: *files\n")
    recipe = load_recipe(path)
    assert recipe.data.val_files == recipe.data.train_files == ["a.txt", "b.txt"]


def test_a_huge_value_of_the_wrong_type_is_named_not_printed(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({"train": {"lr": ["x" * 1000] * 1000},
                                "run": {"seed": "y" * 1_000_000}}))
    with pytest.raises(RecipeError) as refused:
        load_recipe(path)
    message = str(refused.value).removeprefix(f"{path}: ")
    assert message.startswith(("train.lr ", "run.seed ")) and len(message) < 200


@pytest.mark.parametrize(("override", "key"), [
    ("train.batch_size=100000000", "train.batch_size (100000000)"),
    ("eval.batch_size=100000000", "eval.batch_size (100000000)"),
    ("model.n_embd=65536", "model ("),
    ("data.shuffle_tokens=100000000000", "data.shuffle_tokens (100000000000)"),
])
def test_a_size_that_cannot_fit_is_refused_before_it_is_allocated(tmp_path, capsys, corpus_file,
                                                                  override, key):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(tiny_recipe_dict(corpus_file, tmp_path / "run")))
    code, out, err = cli(["train", str(recipe), override], capsys)
    assert code == 2
    [line] = [line for line in err.splitlines() if line.startswith("hftrain: error:")]
    assert "this run needs at least" in line and f"{key}" in line and "alone needs" in line
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing written


def test_the_model_is_measured_without_memory_gpt2_124m():
    """GPT-2 124M (the PTB BPE recipe's shape with GPT-2's 50,257 ids) counted on the meta
    device: the figure everyone quotes, with no weights allocated."""
    recipe = load_recipe(REPO / "recipes" / "ptb" / "gpt2-bpe-pretrain.yaml",
                         ["model.n_layer=12", "model.n_head=12", "model.n_embd=768"])

    class Vocabulary:  # GPT-2's, as far as a model's shape is concerned
        bos_token_id = eos_token_id = pad_token_id = 50256

        def __len__(self) -> int:
            return 50257

    fields = recipe.model
    assert not fields.init_from
    parameters, layers, width = model_sizes(fields, Vocabulary(), 1024)
    assert (layers, width) == (12, 768)
    assert parameters == 124_439_808


@pytest.fixture(scope="module")
def bpe(shakespeare_text):
    return build_tokenizer(TokenizerConfig(kind="byte_bpe", vocab_size=400),
                           [shakespeare_text], 16)


@pytest.mark.parametrize("sample_by", ["document", "line"])
def test_a_file_of_one_long_line_is_read_in_bounded_pieces_with_the_lines_tokens(
        tmp_path, monkeypatch, shakespeare_text, bpe, sample_by):
    monkeypatch.setattr(sources, "PIECE_BYTES", 1024)
    monkeypatch.setattr(sources, "LONG_LINE", 2048)
    line = " ".join(shakespeare_text.split())  # 17 KB, not one line break
    path = tmp_path / "one-line.txt"
    path.write_text(line, encoding="utf-8")
    config = DataConfig(train_files=[str(path)], val_fraction=0.0, block_size=16,
                        shuffle_tokens=0, num_workers=0, sample_by=sample_by)
    pieces = SplitPieces(config, "train").pieces
    assert len(pieces) >= 8 and max(p.end - p.start for p in pieces) <= 1024 + 2048
    data = path.read_bytes()
    for piece in pieces[1:]:  # each later piece starts at a single space between words
        assert data[piece.start:piece.start + 1] == b" " and data[piece.start - 1] != 32
    expected = [bpe.bos_token_id, *bpe(line).input_ids, bpe.eos_token_id]  # one document
    stream = DataStreams(config, bpe, seed=0).train_batches(4)
    blocks: list[list[int]] = []
    while len(blocks) * 16 + 1 < len(expected):
        blocks += blocks_of(next(stream))
    assert unpack(blocks)[:len(expected)] == expected
    stream.close()


def test_a_long_stretch_without_spaces_is_cut_at_a_character_boundary(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "PIECE_BYTES", 1000)
    monkeypatch.setattr(sources, "LONG_LINE", 1000)
    text = "\u00e9\u2014" * 5000  # 25 KB of two- and three-byte characters, no space
    path = tmp_path / "no-spaces.txt"
    path.write_text(text, encoding="utf-8")
    config = DataConfig(train_files=[str(path)], val_fraction=0.0)
    pieces = SplitPieces(config, "train").pieces
    assert len(pieces) >= 12 and max(p.end - p.start for p in pieces) <= 2000
    pieces_text = [document for piece in pieces
                   for document in SplitPieces(config, "train").documents(piece)]
    assert "".join(pieces_text) == text  # every cut between two characters


def test_a_typo_in_num_workers_starts_one_worker_per_cpu_not_a_million(tmp_path, capsys,
                                                                      corpus_file):
    """`data.num_workers=1000000` forked until the machine ran out of memory (it took the
    test suite running beside it down): now at most one worker per usable CPU starts, with a
    warning, and the run trains on the same batches."""
    from hftrain.workers import usable_cpus, worker_count

    assert worker_count(1_000_000) == usable_cpus() and worker_count(1) == 1
    runs = {}
    for workers in (1, 1_000_000):
        recipe = tmp_path / f"r{workers}.yaml"
        recipe.write_text(json.dumps(tiny_recipe_dict(
            corpus_file, tmp_path / f"run{workers}", train={"max_steps": 4, "log_interval": 1},
            eval={"interval": 4, "batch_size": 16})))
        code, out, err = cli(["train", str(recipe), f"data.num_workers={workers}"], capsys)
        assert code == 0, err
        assert ("data.num_workers 1000000 is more than the" in err) == (workers > 1)
        runs[workers] = [r["loss"] for r in read_metrics(tmp_path / f"run{workers}" /
                                                         "metrics.jsonl") if "loss" in r]
    assert len(runs[1]) == 4 and runs[1] == runs[1_000_000]
