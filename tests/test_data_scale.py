"""The data pipeline at scale (issue 11): a stream's position is saved and restored exactly,
without replay; batches do not depend on the number of workers; a large one-document file is
read in pieces cut at line breaks, and its held-out split is still its last fraction; a bad
byte read by a worker is one DataError naming file and line; the token cache is built once,
rebuilt when its data changes, never written over a folder hftrain did not make, and trains;
a run killed and resumed with workers or a cache trains on the blocks of the uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, blocks_of, run_or_dump, tiny_recipe_dict, unpack
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

import hftrain.data.loader as loader
import hftrain.data.sources as sources
from hftrain.checkpoint import latest_checkpoint
from hftrain.cli import main
from hftrain.data import IGNORE_INDEX, DataStreams, texts
from hftrain.data.cache import CACHE_RECORD, open_for, prepare
from hftrain.data.loader import TrainStream
from hftrain.data.sources import SplitPieces
from hftrain.errors import DataError, HftrainError
from hftrain.recipe import DataConfig, TokenizerConfig, recipe_from_dict
from hftrain.tokenizer import build_tokenizer
from hftrain.tracking import read_metrics
from hftrain.train import train

FAULTS = REPO / "tests" / "fault_injection.py"
SMALL_PIECE = 2048
"""Piece size for the tests: the 20 KB corpus is read in about ten pieces."""


@pytest.fixture(scope="module")
def tok(shakespeare_text):
    return build_tokenizer(TokenizerConfig(kind="char"), [shakespeare_text], 16)


@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(sources, "PIECE_BYTES", SMALL_PIECE)


def stream_tokens(stream, n_tokens: int, block_size: int) -> list[int]:
    """At least the first `n_tokens` tokens of a stream of text blocks, unpacked."""
    blocks: list[list[int]] = []
    while len(blocks) * block_size + 1 < n_tokens:
        blocks += blocks_of(next(stream))
    return unpack(blocks)


def checkpointed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A stream state as a resumed process gets it: written to safetensors, read back."""
    return load_tensors(save_tensors({k: v.contiguous() for k, v in state.items()}))


def assert_same_batch(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.equal(a["labels"], b["labels"])
    assert a.get("reset_state") == b.get("reset_state")


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def sft_records(text: str) -> list[dict[str, str]]:
    lines = [line for line in text.split("\n") if line.strip()]
    return [{"prompt": f"Q: {a}\nA: ", "completion": b} for a, b in zip(lines, lines[1:],
                                                                        strict=False)]


STREAMS = {
    "text": dict(block_size=16, shuffle_tokens=16 * 24, num_workers=0),
    "text_2_workers": dict(block_size=16, shuffle_tokens=16 * 24, num_workers=2),
    "sft_packed": dict(kind="sft", block_size=32, shuffle_tokens=32 * 12, num_workers=1),
    "sft_unpacked": dict(kind="sft", packing=False, block_size=32, shuffle_tokens=32 * 12,
                         num_workers=0),
    "lanes": dict(block_size=16, num_workers=1),
    "cache": dict(block_size=16, shuffle_tokens=16 * 24),
}


@pytest.fixture
def make_stream(tmp_path, corpus_file, shakespeare_text, tok, small_pieces):
    """A function that builds a fresh training stream of the given kind (as a restarted
    process would), over the 20 KB corpus cut in small pieces, 4 blocks a batch."""

    def make(kind: str):
        settings = dict(STREAMS[kind])
        files = [str(corpus_file)]
        if kind.startswith("sft"):
            jsonl = tmp_path / "records.jsonl"
            if not jsonl.exists():
                jsonl.write_text("".join(json.dumps(r) + "\n"
                                         for r in sft_records(shakespeare_text)))
            files = [str(jsonl)]
        if kind == "cache":
            settings["cache"] = str(tmp_path / "cache")
        config = DataConfig(train_files=files, **settings)
        if kind == "cache":
            prepare(config, tok, show_progress=False)
        return DataStreams(config, tok, seed=7, stateful=kind == "lanes").train_batches(4)

    return make


STOPS = (0, 1, 9, 300)
"""Where the position is saved: at the start, after one batch, mid-epoch, in the second epoch."""
AFTER = 12


@pytest.mark.parametrize("kind", list(STREAMS))
def test_a_restored_position_continues_exactly_where_the_stream_was(make_stream, kind):
    reference = make_stream(kind)
    batches, states = [], {}
    for i in range(max(STOPS) + AFTER):
        if i in STOPS:
            states[i] = checkpointed(reference.state_dict())
        batches.append(next(reference))
    assert reference.epoch >= 1  # the stops span an epoch boundary
    reference.close()
    for stop in STOPS:
        resumed = make_stream(kind)  # a new process: nothing is replayed
        resumed.load_state_dict(states[stop])
        for i in range(stop, stop + AFTER):
            assert_same_batch(next(resumed), batches[i])
        resumed.close()


@pytest.mark.parametrize("kind", list(STREAMS))
def test_peek_leaves_the_position_before_the_peeked_batch(make_stream, kind):
    stream = make_stream(kind)
    for _ in range(5):
        next(stream)
    before = checkpointed(stream.state_dict())
    peeked = stream.peek()
    assert_same_state(checkpointed(stream.state_dict()), before)
    resumed = make_stream(kind)  # a checkpoint taken after a peek resumes at the peeked batch
    resumed.load_state_dict(checkpointed(stream.state_dict()))
    assert_same_batch(next(resumed), peeked)
    assert_same_batch(next(stream), peeked)
    for _ in range(3):
        assert_same_batch(next(stream), next(resumed))
    stream.close()
    resumed.close()


@pytest.mark.parametrize("sample_by", ["document", "line"])
def test_batches_do_not_depend_on_the_number_of_workers(corpus_file, tok, small_pieces,
                                                        sample_by):
    streams = [DataStreams(DataConfig(train_files=[str(corpus_file)], sample_by=sample_by,
                                      block_size=16, shuffle_tokens=16 * 24, num_workers=w),
                           tok, seed=1).train_batches(4) for w in (0, 1, 2)]
    for _ in range(320):  # into the second epoch (pieces in a new order)
        first, *others = [next(s) for s in streams]
        for other in others:
            assert_same_batch(other, first)
    assert streams[0].epoch >= 1
    for s in streams:
        s.close()


def test_a_one_document_file_is_read_in_pieces_cut_at_line_breaks(corpus_file,
                                                                  shakespeare_text, tok,
                                                                  monkeypatch):
    monkeypatch.setattr(sources, "PIECE_BYTES", 4096)
    config = DataConfig(train_files=[str(corpus_file)], val_fraction=0.0, block_size=16,
                        shuffle_tokens=0, num_workers=1)
    data = corpus_file.read_bytes()
    pieces = SplitPieces(config, "train").pieces
    assert len(pieces) >= len(data) // 4096 >= 4
    assert pieces[0].start == 0 and pieces[-1].end == len(data)
    for before, piece in zip(pieces, pieces[1:], strict=False):
        assert before.end == piece.start and data[piece.start - 1:piece.start] == b"\n"
    assert max(p.end - p.start for p in pieces) < 4096 + 200  # bounded memory: one piece

    stream = DataStreams(config, tok, seed=0).train_batches(4)
    document = [*tok(shakespeare_text).input_ids, tok.eos_token_id]  # one document, one EOS
    got = stream_tokens(stream, len(document) + 41, 16)
    assert got[0] == tok.bos_token_id  # the stream opens with the start token (= EOS)
    assert got[1:len(document) + 1] == document
    assert got[len(document) + 1:] == document[:len(got) - len(document) - 1]  # next epoch
    assert stream.counters["tokens"] >= len(document)
    stream.close()


@pytest.mark.parametrize("piece_bytes", [1 << 20, 1024])
def test_the_held_out_split_of_a_one_document_file_is_its_last_fraction(
        corpus_file, shakespeare_text, tok, monkeypatch, piece_bytes):
    monkeypatch.setattr(sources, "PIECE_BYTES", piece_bytes)
    config = DataConfig(train_files=[str(corpus_file)], val_fraction=0.1, block_size=16,
                        shuffle_tokens=0, num_workers=0)
    streams = DataStreams(config, tok, seed=0)
    assert len(streams.pieces("val").pieces) == (1 if piece_bytes > 20_000 else 2)
    labels = [t for b in streams.val_batches(8) for t in b["labels"].flatten().tolist()
              if t != IGNORE_INDEX]
    cut = int(len(shakespeare_text) * 0.9)
    # Validation targets: the held-out text (after the start token) and the closing EOS.
    assert tok.decode(labels[:-1]) == shakespeare_text[cut:]
    assert labels[-1] == tok.eos_token_id and labels.count(tok.eos_token_id) == 1
    # Training: the start token, the first 90%, and EOS.
    expected = [tok.bos_token_id, *tok(shakespeare_text[:cut]).input_ids, tok.eos_token_id]
    got = stream_tokens(streams.train_batches(4), len(expected), 16)
    assert got[:len(expected)] == expected


def test_a_held_out_cut_never_splits_a_character(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "PIECE_BYTES", 512)
    text = ("x" + "\u2014" * 7 + "\n") * 101  # 23 bytes a line: 90% of the bytes is mid-dash
    path = tmp_path / "dashes.txt"
    path.write_text(text, encoding="utf-8")
    config = DataConfig(train_files=[str(path)], val_fraction=0.1)
    train_text = "".join(texts(config, "train"))  # the pieces of the one document
    val_text = "".join(texts(config, "val"))
    assert train_text + val_text == text
    assert 0 < len(val_text) <= 0.11 * len(text)


def test_a_bad_byte_read_by_a_worker_is_one_data_error_naming_file_and_line(
        tmp_path, shakespeare_text, tok, small_pieces):
    lines = shakespeare_text.split("\n")
    bad = len(lines) * 2 // 3  # in a later piece, not the first
    path = tmp_path / "corpus.txt"
    path.write_bytes("\n".join(lines[:bad]).encode() + b"\n\xff"
                     + "\n".join(lines[bad:]).encode())
    config = DataConfig(train_files=[str(path)], sample_by="line", block_size=16,
                        shuffle_tokens=0, num_workers=1)
    stream = DataStreams(config, tok, seed=0).train_batches(4)
    with pytest.raises(DataError) as info:
        for _ in range(1000):  # more than an epoch
            next(stream)
    message = str(info.value)
    assert f"{path} line {bad + 1}: not UTF-8" in message
    assert "Traceback" not in message and "worker" not in message and "\n" not in message
    stream.close()


# The token cache -----------------------------------------------------------------------


def cache_config(corpus: Path, folder: Path, **settings) -> DataConfig:
    return DataConfig(train_files=[str(corpus)], block_size=16, shuffle_tokens=0,
                      cache=str(folder), **settings)


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_the_cache_is_built_once_holds_the_streamed_tokens_and_follows_its_data(
        tmp_path, corpus_file, shakespeare_text, tok):
    folder = tmp_path / "cache"
    config = cache_config(corpus_file, folder)
    assert prepare(config, tok, show_progress=False) == folder
    built = mtimes(folder)
    prepare(config, tok, show_progress=False)
    assert mtimes(folder) == built  # a second prepare reads nothing and writes nothing

    cached = open_for(config, tok).tokens("train")  # the tokens streaming reads in an epoch
    streamed = DataStreams(DataConfig(train_files=[str(corpus_file)], block_size=16,
                                      shuffle_tokens=0), tok, seed=0).train_batches(4)
    assert stream_tokens(streamed, len(cached), 16)[:len(cached)] == cached.tolist()

    corpus_file.write_text(shakespeare_text + "\nAnd one more line.\n", encoding="utf-8")
    with pytest.raises(DataError, match="hftrain prepare"):
        open_for(config, tok)  # a stale cache is never read
    prepare(config, tok, show_progress=False)
    assert mtimes(folder)["train.bin"] != built["train.bin"]
    assert len(open_for(config, tok).tokens("train")) > len(cached)


@pytest.mark.parametrize("stateful", [False, True])
def test_cached_validation_scores_what_streamed_validation_scores(tmp_path, corpus_file, tok,
                                                                  stateful):
    """The same tokens, targets and bytes per target (bits per byte) from the cache as from
    the stream, blocks or lanes: a cache never changes a reported figure."""
    config = cache_config(corpus_file, tmp_path / "cache", val_fraction=0.1)
    prepare(config, tok, show_progress=False)
    streamed = dataclasses.replace(config, cache=None)
    from_cache = list(DataStreams(config, tok, 0, stateful=stateful).val_batches(4))
    from_files = list(DataStreams(streamed, tok, 0, stateful=stateful).val_batches(4))
    assert len(from_cache) == len(from_files) > 1
    for a, b in zip(from_cache, from_files, strict=True):
        for key in ("input_ids", "labels", "byte_counts"):
            assert torch.equal(a[key], b[key]), key
    held_out = corpus_file.read_bytes()[int(corpus_file.stat().st_size * 0.9):]
    scored = sum(int(b["byte_counts"][b["labels"] != IGNORE_INDEX].sum()) for b in from_cache)
    assert abs(scored - len(held_out)) <= 3  # the cut lands on a character boundary


def test_nodes_compare_caches_by_their_tokens_whenever_they_were_built(tmp_path, corpus_file,
                                                                     tok):
    """Nodes that each build a cache compare `split_digests`: the SHA-256 of each split's
    tokens, recorded when built, or hashed now for a cache built before the record held it."""
    from hftrain.data.cache import CACHE_RECORD, split_digests

    fresh = prepare(cache_config(corpus_file, tmp_path / "fresh"), tok, show_progress=False)
    old = prepare(cache_config(corpus_file, tmp_path / "old"), tok, show_progress=False)
    record = json.loads((old / CACHE_RECORD).read_text())
    for entry in record["splits"].values():
        del entry["sha256"]
    (old / CACHE_RECORD).write_text(json.dumps(record))
    assert split_digests(old) == split_digests(fresh)
    assert set(split_digests(fresh)) == {"train", "val"}
    lines = corpus_file.read_text(encoding="utf-8").splitlines(keepends=True)
    other = "".join(reversed(lines))  # the same characters, another order
    (tmp_path / "other.txt").write_text(other, encoding="utf-8")
    changed = prepare(cache_config(tmp_path / "other.txt", tmp_path / "changed"), tok,
                      show_progress=False)
    assert split_digests(changed)["train"]["sha256"] != split_digests(fresh)["train"]["sha256"]


def test_the_cache_never_writes_over_a_folder_hftrain_did_not_make(tmp_path, corpus_file, tok):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    with pytest.raises(DataError, match="did not write"):
        prepare(cache_config(corpus_file, folder), tok, show_progress=False)
    assert {p.name: p.read_text() for p in folder.iterdir()} == {"notes.txt": "my notes"}


def test_a_bad_byte_stops_prepare_with_one_line_and_leaves_no_cache(tmp_path, shakespeare_text,
                                                                    tok, small_pieces):
    path = tmp_path / "corpus.txt"
    path.write_bytes(shakespeare_text[:15_000].encode() + b"\xff" + shakespeare_text[15_000:]
                     .encode())
    line = shakespeare_text[:15_000].count("\n") + 1
    with pytest.raises(DataError, match=f"{path} line {line}: not UTF-8"):
        prepare(cache_config(path, tmp_path / "cache"), tok, show_progress=False)
    assert not (tmp_path / "cache").exists()
    left = sorted(p.name for p in tmp_path.iterdir())  # nothing half-written (the builders'
    assert left == [".cache.lock", "corpus.txt"]  # lock file beside it stays, empty)


def test_a_cache_made_with_another_tokenizer_is_refused(tmp_path, corpus_file, shakespeare_text,
                                                       tok):
    config = cache_config(corpus_file, tmp_path / "cache")
    prepare(config, tok, show_progress=False)
    other = build_tokenizer(TokenizerConfig(kind="char"), [shakespeare_text + "\u00e9"], 16)
    with pytest.raises(DataError, match="tokenizer"):
        open_for(config, other)
    with pytest.raises(DataError, match="tokenizer"):
        DataStreams(config, other, seed=0)
    assert json.loads((tmp_path / "cache" / CACHE_RECORD).read_text())  # left as it was


@pytest.mark.parametrize("edit", ["same size and mtime", "out-of-range id"])
def test_a_token_cache_altered_after_it_was_built_is_rebuilt(edit, tmp_path, corpus_file, tok,
                                                            capsys):
    """Bytes of train.bin changed in place, keeping its size and mtime (or one token turned
    into an id the tokenizer does not have): the next prepare says so and rebuilds it,
    instead of training on other tokens or failing mid-run."""
    config = cache_config(corpus_file, tmp_path / "cache")
    folder = prepare(config, tok, show_progress=False)
    tokens = folder / "train.bin"
    original, stat = tokens.read_bytes(), tokens.stat()
    with tokens.open("r+b") as f:
        if edit == "out-of-range id":
            f.seek(40)
            f.write(b"\xff\xff")
        else:
            f.write(original[100:200])
    os.utime(tokens, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert tokens.read_bytes() != original and tokens.stat().st_size == stat.st_size
    capsys.readouterr()
    prepare(config, tok, show_progress=False)
    assert "changed after it was built" in capsys.readouterr().err
    assert tokens.read_bytes() == original


def logged_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def test_hftrain_prepare_then_train_from_the_cache(tmp_path, corpus_file, capsys):
    data = tiny_recipe_dict(corpus_file, tmp_path / "run", train={"max_steps": 40})
    data["data"]["cache"] = str(tmp_path / "cache")
    recipe = tmp_path / "run.yaml"
    recipe.write_text(json.dumps(data))
    main(["prepare", str(recipe)])
    assert "token cache" in capsys.readouterr().out
    built = mtimes(tmp_path / "cache")
    result = train(recipe_from_dict(data), recipe)
    assert mtimes(tmp_path / "cache") == built  # trained from it, not rebuilt
    assert (result.run_dir / "final" / "config.json").is_file()
    losses = list(logged_losses(result.run_dir).values())
    assert losses[-1] < losses[0] - 0.3


@pytest.mark.parametrize("command", ["prepare", "train"])
def test_a_cache_folder_of_someone_else_is_refused_before_anything_is_written(
        tmp_path, corpus_file, capsys, command):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    data = tiny_recipe_dict(corpus_file, tmp_path / "run")
    data["data"]["cache"] = str(theirs)
    recipe = tmp_path / "run.yaml"
    recipe.write_text(json.dumps(data))
    with pytest.raises(SystemExit) as exit_info:
        main([command, str(recipe)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(errors) == 1, errors
    assert f"data.cache {theirs} is a folder hftrain did not write" in errors[0]
    assert not (tmp_path / "run").exists()  # not even the tokenizer
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "run.yaml", "theirs"]
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("where", ["the run folder", "inside the run folder", "under a file"])
def test_a_cache_that_cannot_be_a_cache_is_refused_up_front(tmp_path, corpus_file, capsys,
                                                             where):
    (tmp_path / "afile").write_text("x")
    cache = {"the run folder": tmp_path / "run", "inside the run folder": tmp_path / "run" / "c",
             "under a file": tmp_path / "afile" / "c"}[where]
    data = tiny_recipe_dict(corpus_file, tmp_path / "run")
    data["data"]["cache"] = str(cache)
    recipe = tmp_path / "run.yaml"
    recipe.write_text(json.dumps(data))
    for command in ("prepare", "train"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, str(recipe)])
        errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert exit_info.value.code == 2 and len(errors) == 1, errors
        expected = "is under" if where == "under a file" else "overlap"
        assert expected in errors[0], errors[0]
        assert not (tmp_path / "run").exists()  # nothing written, not even the tokenizer


def test_a_folder_given_as_a_data_file_is_named_as_such(tmp_path, tok):
    folder = tmp_path / "texts"
    folder.mkdir()
    with pytest.raises(DataError, match=f"data file {folder} .* is not a regular file"):
        DataStreams(DataConfig(train_files=[str(folder)]), tok, 0).train_batches(2)


def test_a_run_that_builds_the_cache_trains_as_one_that_finds_it(tmp_path, corpus_file):
    """The same recipe and seed give the same run whether or not the cache was there."""
    runs = []
    for name in ("builds", "finds"):
        data = tiny_recipe_dict(corpus_file, tmp_path / name, train={"max_steps": 10})
        data["data"]["cache"] = str(tmp_path / "cache")
        runs.append(train(recipe_from_dict(data)).run_dir)
    assert logged_losses(runs[0]) == logged_losses(runs[1])


# Kill -9 and resume, through the CLI ---------------------------------------------------


def trained_steps(record: Path) -> dict[int, str]:
    """step -> digest of its micro-batches; a later line for a step wins (a resumed run
    retrains the steps the killed run did after its last checkpoint)."""
    steps = {}
    for line in record.read_text().splitlines():
        step, digest = line.split()
        steps[int(step)] = digest
    return steps


def run_with_fault(record: Path, recipe: Path, kill_at_step: int = 0,
                   extra: tuple[str, ...] = ()) -> tuple[int, str]:
    """Exit code and stderr of `hftrain train` under tests/fault_injection.py. The output goes
    to a file, not a pipe: data workers outliving a killed run must not keep the test
    waiting, and a run that hangs fails the test instead of stalling it."""
    log = record.with_suffix(f".{kill_at_step}{''.join(extra)}.log")
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, str(FAULTS), str(record), str(kill_at_step), "0",
                               "--", "train", str(recipe), *extra],
                              stdout=out, stderr=out, cwd=REPO, timeout=180)
    return proc.returncode, log.read_text()[-2000:]


def test_a_run_killed_with_9_takes_its_workers_and_their_fork_server_with_it(tmp_path,
                                                                             corpus_file):
    """The output goes to pipes this time: they close only once every process holding them
    (the data workers, the fork server they start from) has exited. Workers once outlived a
    killed trainer: their parent is the fork server, which waited for them in turn."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(tiny_recipe_dict(
        corpus_file, tmp_path / "run", data={"num_workers": 2}, train={"max_steps": 30})))
    killed = run_or_dump([sys.executable, str(FAULTS), str(tmp_path / "record"), "12", "0",
                          "--", "train", str(recipe)], 180, cwd=REPO)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]


# The default suite kills the run with workers (the subtlest state); the cache and dropout
# variants (a minute of CI each) run with `pytest -m slow`.
@pytest.mark.parametrize("setting", ["workers", pytest.param("cache", marks=pytest.mark.slow),
                                     pytest.param("dropout", marks=pytest.mark.slow)])
def test_kill_9_then_resume_trains_on_the_blocks_of_the_uninterrupted_run(tmp_path,
                                                                          shakespeare_text,
                                                                          setting):
    """Workers and the cache keep resume exact; so does a model with dropout (the data
    loader must not shift the random stream a resumed run continues). The corpus is 16 files,
    so that the resumed run reads new pieces before it ends."""
    shards = []
    for i in range(16):
        shards.append(tmp_path / f"part{i}.txt")
        shards[-1].write_text(shakespeare_text[i * 1250:(i + 1) * 1250], encoding="utf-8")
    runs = {}
    for name in ("whole", "killed"):
        data = tiny_recipe_dict(shards[0], tmp_path / name)
        data["data"]["train_files"] = [str(path) for path in shards]
        data["train"].update({"max_steps": 30, "log_interval": 5})
        data["checkpoint"] = {"interval": 10, "keep": 2}
        data["data"]["shuffle_tokens"] = 16 * 16  # a buffer much smaller than the corpus
        if setting == "workers":
            data["data"]["num_workers"] = 2
        elif setting == "cache":
            data["data"]["cache"] = str(tmp_path / f"{name}-cache")
        else:
            data["model"]["dropout"] = 0.1
        runs[name] = tmp_path / f"{name}.yaml"
        runs[name].write_text(json.dumps(data))
    code, err = run_with_fault(tmp_path / "whole.record", runs["whole"])
    assert code == 0, err
    code, err = run_with_fault(tmp_path / "killed.record", runs["killed"], kill_at_step=24)
    assert code == -signal.SIGKILL, err
    assert latest_checkpoint(tmp_path / "killed").name == "step-00000020"
    code, err = run_with_fault(tmp_path / "killed.record", runs["killed"], extra=("--resume",))
    assert code == 0, err
    assert trained_steps(tmp_path / "killed.record") == trained_steps(tmp_path / "whole.record")
    expected, got = logged_losses(tmp_path / "whole"), logged_losses(tmp_path / "killed")
    assert got.keys() == expected.keys()
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step


# Regressions of the review's fixes --------------------------------------------------------


def test_a_hub_dataset_holds_out_the_tail_of_each_document(tmp_path):
    """A dataset without a validation split holds out the last val_fraction of each document
    (a local folder loads as a Hub dataset does, offline); none is an error."""
    documents = [f"Document {i}: " + "the quick brown fox " * (5 + i) for i in range(6)]
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "data.jsonl").write_text("".join(json.dumps({"text": d}) + "\n"
                                               for d in documents))
    config = DataConfig(dataset=str(folder), val_fraction=0.1)
    heads, tails = list(texts(config, "train")), list(texts(config, "val"))
    assert len(heads) == len(tails) == len(documents)
    for document, head, tail in zip(documents, heads, tails, strict=True):
        assert head + tail == document  # split, not trained on twice
        assert 0 < len(tail) <= 0.1 * len(document) + 1 and len(head) > 8 * len(tail)
    with pytest.raises(DataError, match="no validation data"):
        list(texts(DataConfig(dataset=str(folder), val_fraction=0.0), "val"))


@pytest.mark.parametrize("kind", ["text", "sft_packed"])
def test_packed_streams_carry_no_document_lengths(make_stream, kind):
    """Packing cuts by tokens, not documents: the position saved with every checkpoint must
    not grow with every document read."""
    stream = make_stream(kind)
    pieces = 0
    for _ in range(200):
        next(stream)
        assert len(stream.carry_lengths) == 0
        pieces = stream.counters["pieces"]
    assert pieces >= 3  # several pieces, many documents read
    assert stream.state_dict()["data.carry_lengths"].numel() == 0
    stream.close()


@pytest.mark.parametrize("signum", [pytest.param(signal.SIGINT, marks=pytest.mark.slow),
                                    signal.SIGTERM])
def test_a_signal_to_the_process_group_checkpoints_and_resume_finishes(tmp_path, corpus_file,
                                                                        signum):
    """Ctrl-C in a terminal (SIGINT) and a scheduler's preemption (SIGTERM) reach the data
    workers too: they must leave the stop to the training process, which checkpoints and
    exits 128 + signum (130, 143) without a worker traceback. The workers ignore both in one
    place (`hftrain.workers.worker_init`), so the default suite sends SIGTERM only (each
    variant is a minute of CI); `pytest -m slow` sends Ctrl-C's too."""
    data = tiny_recipe_dict(corpus_file, tmp_path / "run", data={"num_workers": 1},
                            train={"max_steps": 300, "log_interval": 5}, eval={"interval": 500})
    recipe = tmp_path / "run.yaml"
    recipe.write_text(json.dumps(data))
    metrics, out, err = (tmp_path / "run" / "metrics.jsonl", tmp_path / "stopped.out",
                         tmp_path / "stopped.err")
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "hftrain", "train", str(recipe)],
                                stdout=stdout, stderr=stderr, cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (metrics.exists() and '"loss"' in metrics.read_text()):  # training, with
            assert proc.poll() is None, err.read_text()[-2000:]  # its worker running
            assert time.monotonic() < deadline, "no training line after 120 s"
            time.sleep(0.01)
        os.killpg(proc.pid, signum)  # as a terminal's Ctrl-C does
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = err.read_text()
    assert code == 128 + signum, log[-2000:]
    assert "DataLoader worker" not in log and "Traceback" not in log, log[-2000:]
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert checkpoint is not None and "stopped at step" in log
    assert not (tmp_path / "run" / "final").exists()
    out, err = tmp_path / "resumed.out", tmp_path / "resumed.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        resumed = subprocess.run([sys.executable, "-m", "hftrain", "train", str(recipe),
                                  "--resume"], stdout=stdout, stderr=stderr, cwd=REPO,
                                 timeout=300)
    assert resumed.returncode == 0, err.read_text()[-2000:]
    assert "resumed at step" in out.read_text()
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    assert max(logged_losses(tmp_path / "run")) == 300


@pytest.mark.parametrize("piece_bytes", [1 << 20, 64])
def test_the_fine_tuning_hold_out_counts_records_across_files(tmp_path, monkeypatch,
                                                              piece_bytes):
    """Record i of the whole split validates when (i + 1) * val_fraction reaches an integer:
    with 20 records in 4 files of 5, records 9 and 19, whatever the files and pieces."""
    monkeypatch.setattr(sources, "PIECE_BYTES", piece_bytes)
    files = []
    for f in range(4):
        files.append(tmp_path / f"part{f}.jsonl")
        files[-1].write_text("".join(
            json.dumps({"prompt": f"Q{5 * f + i}?", "completion": f" A{5 * f + i}."}) + "\n"
            for i in range(5)))
    config = DataConfig(kind="sft", train_files=[str(p) for p in files], val_fraction=0.1)
    assert len(SplitPieces(config, "train").pieces) >= (4 if piece_bytes > 1000 else 8)
    assert list(texts(config, "val")) == ["Q9?\n A9.", "Q19?\n A19."]
    assert list(texts(config, "train")) == [f"Q{n}?\n A{n}." for n in range(20)
                                            if n not in (9, 19)]


def position_mark(stream) -> int:
    """What changes at the boundary a failed step may cross: the piece read (streamed text)
    or the epoch (the token cache, lanes)."""
    return stream.counters["pieces"] if isinstance(stream, TrainStream) else stream.epoch


@pytest.mark.parametrize("kind", ["text", "text_2_workers", "cache", "lanes"])
def test_a_failed_step_does_not_count_its_batches_as_read(make_stream, kind):
    """A step that fails after drawing 3 micro-batches is rolled back before the checkpoint:
    the stream gives those batches again, also when the step had crossed into a new piece
    (workers restarted) or a new epoch."""
    reference, batches, marks = make_stream(kind), [], []
    crossing = None  # the first batch after the first that moved to a new piece or epoch
    while crossing is None or len(batches) < crossing + 4:
        batches.append(next(reference))
        marks.append(position_mark(reference))
        if crossing is None and len(marks) > 2 and marks[-1] > marks[-2]:
            crossing = len(marks) - 1
    reference.close()
    start = crossing - 1  # the failed step's 3 batches cross the boundary

    stream = make_stream(kind)
    for _ in range(start):
        next(stream)
    before, mark = checkpointed(stream.state_dict()), position_mark(stream)
    stream.begin_step()
    for i in range(3):
        assert_same_batch(next(stream), batches[start + i])
    assert position_mark(stream) > mark
    stream.rollback_step()  # what the training loop does before its after-failure checkpoint
    assert_same_state(checkpointed(stream.state_dict()), before)
    for i in range(start, start + 4):
        assert_same_batch(next(stream), batches[i])
    stream.close()


def test_an_error_at_the_end_of_an_epoch_leaves_a_valid_position(corpus_file, tok,
                                                                 small_pieces, monkeypatch):
    """A data file found changed when an epoch ends stops the stream; the position saved
    then is the next epoch's start, and a stream loaded from it goes on as if nothing failed."""
    config = DataConfig(train_files=[str(corpus_file)], block_size=16, shuffle_tokens=16 * 24,
                        num_workers=0)

    def stream_from(state):  # one block a batch: the failure interrupts no batch half-way
        stream = DataStreams(config, tok, seed=7).train_batches(1)
        stream.load_state_dict(state)
        return stream

    first = DataStreams(config, tok, seed=7).train_batches(1)
    for _ in range(5):
        next(first)
    saved = checkpointed(first.state_dict())
    real, calls = loader.check_unchanged, []

    def fails_once(fingerprints):
        calls.append(fingerprints)
        if len(calls) == 1:
            raise DataError(f"{corpus_file} changed during the run")
        real(fingerprints)

    monkeypatch.setattr(loader, "check_unchanged", fails_once)
    failed, n = stream_from(saved), 0
    with pytest.raises(DataError, match="changed during the run"):
        while n < 10_000:
            next(failed)
            n += 1
    assert 100 < n < 10_000
    state = checkpointed(failed.state_dict())
    assert state["data.position"][:2].tolist() == [1, 0]  # epoch 1, piece 0
    resumed, unfailed = stream_from(state), stream_from(saved)
    for _ in range(n):
        next(unfailed)
    for _ in range(4 * AFTER):
        expected = next(unfailed)
        assert_same_batch(next(resumed), expected)
        assert_same_batch(next(failed), expected)  # the failed stream itself goes on too
    assert unfailed.epoch == 1 and len(calls) == 2


def test_a_stale_cache_holding_a_file_hftrain_did_not_write_is_left_as_it_was(
        tmp_path, corpus_file, shakespeare_text, tok):
    folder = tmp_path / "cache"
    config = cache_config(corpus_file, folder)
    prepare(config, tok, show_progress=False)
    (folder / "notes.txt").write_text("my notes")
    corpus_file.write_text(shakespeare_text + "\nAnd one more line.\n", encoding="utf-8")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(DataError, match="notes.txt"):
        prepare(config, tok, show_progress=False)  # a rebuild would replace the folder
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.parametrize("cut", [2, 3, 6])  # bytes: whole tokens, or half of one
def test_a_truncated_token_cache_is_refused_as_damaged(tmp_path, corpus_file, tok, cut):
    folder = tmp_path / "cache"
    config = cache_config(corpus_file, folder)
    prepare(config, tok, show_progress=False)
    train_bin = folder / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:-cut])
    with pytest.raises(DataError, match="damaged"):
        open_for(config, tok)
    with pytest.raises(DataError, match="damaged"):
        DataStreams(config, tok, seed=0)


@pytest.mark.parametrize("where", ["read-only folder", "under a file"])
def test_a_token_cache_that_cannot_be_written_is_one_error(tmp_path, corpus_file, tok, where):
    if where == "read-only folder":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        parent = tmp_path / "read-only"
        parent.mkdir()
        parent.chmod(0o555)
    else:
        parent = tmp_path / "a file"
        parent.write_text("")
    try:
        expected = ("could not write the token cache" if where == "read-only folder"
                    else f"data.cache {parent / 'cache'} is under {parent}, which is a file")
        with pytest.raises(HftrainError, match=re.escape(expected)):
            prepare(cache_config(corpus_file, parent / "cache"), tok, show_progress=False)
    finally:
        if parent.is_dir():
            parent.chmod(0o755)


def test_what_the_fork_server_imports_leaves_out_the_model_classes():
    """Every run's fork server imports `WORKER_MODULES` before its first worker starts:
    transformers' model classes there (through hftrain.models) cost 2 s more on every run
    with workers. A fresh interpreter imports them and lists what came in."""
    from hftrain.workers import WORKER_MODULES

    imports = "; ".join(f"import {m}" for m in WORKER_MODULES if m != "__main__")
    probe = (f"import sys; {imports}; print(sorted(m for m in sys.modules if "
             "m.startswith(('transformers.models.', 'transformers.modeling_', 'peft', "
             " 'hftrain.models.recurrent', 'hftrain.train'))))")
    found = run_or_dump([sys.executable, "-c", probe], timeout=120, cwd=REPO)
    assert found.returncode == 0, found.stderr[-2000:]
    assert found.stdout.strip() == "[]", found.stdout


def test_the_training_module_imports_evaluate_and_matplotlib_only_when_used():
    """`evaluate` (which pulls transformers' pipelines and scipy.stats) is imported when a
    score is first computed and matplotlib when loss.png is drawn, not with hftrain.train:
    what imports it (the CLI, the benchmarks, a notebook) need not pay for them."""
    probe = ("import sys, hftrain.train, hftrain.evaluation, hftrain.tracking; "
             "print(sorted(m for m in sys.modules if m == 'evaluate' "
             "or m.startswith(('scipy.stats', 'matplotlib', 'transformers.pipelines'))))")
    found = run_or_dump([sys.executable, "-c", probe], timeout=120, cwd=REPO)
    assert found.returncode == 0, found.stderr[-2000:]
    assert found.stdout.strip() == "[]", found.stdout
