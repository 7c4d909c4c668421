"""Bad input ends with one clear line and exit status 2, never a traceback, and nothing
half-written: the line names the file and line (or record), the key or the option, and
`hftrain train` creates no run folder. Data files that change during a run stop it before
anything is exported from it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tiny_recipe_dict
from huggingface_hub.errors import HfHubHTTPError

from hftrain import data
from hftrain.cli import main
from hftrain.data import DataStreams
from hftrain.data.loader import TrainStream
from hftrain.errors import DataError
from hftrain.recipe import DataConfig, recipe_from_dict
from hftrain.train import train


def one_error_line(capsys, *argv: str) -> str:
    """Run the CLI; check exit 2, no traceback, and exactly one error line, which it returns."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("hftrain: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def write_recipe(folder: Path, data_file: Path, **sections: dict) -> tuple[Path, Path]:
    """A tiny recipe training on `data_file`; returns the recipe's path and its run folder."""
    run_dir = folder / "run"
    raw = tiny_recipe_dict(data_file, run_dir, **sections)
    path = folder / "recipe.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    return path, run_dir


@pytest.fixture(scope="module")
def export(tmp_path_factory, shakespeare_text) -> Path:
    """A tiny GPT-2 with 64 positions (config n_positions), exported."""
    root = tmp_path_factory.mktemp("export")
    (root / "corpus.txt").write_text(shakespeare_text)
    raw = tiny_recipe_dict(root / "corpus.txt", root / "run", data={"block_size": 64},
                           train={"max_steps": 5})
    return train(recipe_from_dict(raw)).final_dir


def jsonl(*records: object) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


GOOD = {"text": "First Citizen:\nBefore we proceed any further, hear me speak."}
ASK = {"prompt": "Who speaks first? ", "completion": "First Citizen."}
CHAT = {"messages": [{"role": "user", "content": "Who speaks first?"},
                     {"role": "assistant", "content": "First Citizen."}]}

# name, file content, data section, what the error line must say after the file's path
BAD_TRAINING_DATA = [
    ("binary.txt", b"ok\n\xff\xfe\x00bad\n", {}, " line 2: not UTF-8 text (byte 0xff)"),
    ("malformed.jsonl", jsonl(GOOD, GOOD, '{"text": "a"'), {}, " line 3: not valid JSON"),
    ("null.jsonl", jsonl(GOOD, {"text": None}), {}, " line 2: 'text' is null, not a string"),
    ("number.jsonl", jsonl(GOOD, GOOD, {"text": 7}), {}, " line 3: 'text' is a number"),
    ("numbers.parquet", pa.table({"text": pa.array(range(50), pa.int64())}), {},
     ": column 'text' holds int64, not strings"),
    ("null.parquet", pa.table({"text": ["a" * 100, None]}), {},
     " record 2: 'text' is null, not a string"),
    ("messages.jsonl", jsonl(CHAT, CHAT, {"messages": "hello"}), {"kind": "sft"},
     " line 3: 'messages' is a string, not a list of {role, content} objects"),
    ("no_completion.jsonl", jsonl(ASK, {"prompt": "and then? "}, ASK), {"kind": "sft"},
     " line 2: no 'completion'"),
]


@pytest.mark.parametrize(("name", "content", "data_section", "expected"), BAD_TRAINING_DATA,
                         ids=[case[0] for case in BAD_TRAINING_DATA])
def test_bad_training_data_names_file_and_line_and_writes_nothing(tmp_path, capsys, name,
                                                                  content, data_section,
                                                                  expected):
    path = tmp_path / name
    if isinstance(content, pa.Table):
        pq.write_table(content, path)
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    recipe, run_dir = write_recipe(tmp_path, path, data=data_section)
    line = one_error_line(capsys, "train", recipe)
    assert line == f"hftrain: error: {path}{expected}" or line.startswith(
        f"hftrain: error: {path}{expected}")
    assert not run_dir.exists()


@pytest.mark.parametrize("kind", ["text", "sft"])
def test_a_bad_record_met_while_encoding_is_located_too(tmp_path, capsys, export, kind):
    """With a ready tokenizer nothing reads the data before the first batch is encoded: the
    error comes from inside `datasets`' map, and is still located."""
    rows = [GOOD, GOOD, {"text": None}] if kind == "text" else [ASK, ASK, {"prompt": "x"}]
    path = tmp_path / "data.jsonl"
    path.write_text(jsonl(*rows * 1, *[rows[0]] * 40))
    recipe, run_dir = write_recipe(tmp_path, path, tokenizer={"name_or_path": str(export)},
                                   data={"kind": kind, "shuffle_tokens": 0})
    line = one_error_line(capsys, "train", recipe)
    assert line.startswith(f"hftrain: error: {path} line 3: ")
    assert ("'text' is null" if kind == "text" else "no 'completion'") in line
    assert not run_dir.exists()


def test_binary_validation_file_names_the_validation_file(tmp_path, capsys, corpus_file):
    val = tmp_path / "val.txt"
    val.write_bytes(b"fine\nstill fine\n\x00\x9c\x80 not text\n")
    recipe, run_dir = write_recipe(tmp_path, corpus_file,
                                   data={"val_files": [str(val)], "val_fraction": 0.0})
    line = one_error_line(capsys, "train", recipe)
    assert line.startswith(f"hftrain: error: {val} line 3: not UTF-8 text (byte 0x9c)")
    assert not run_dir.exists()


@pytest.mark.parametrize("change", ["truncate", "delete"])
def test_a_data_file_changed_mid_run_stops_it_before_any_export(tmp_path, capsys, monkeypatch,
                                                                shakespeare_text, change):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare_text[:2000])
    recipe, run_dir = write_recipe(tmp_path, corpus, train={"max_steps": 60},
                                   eval={"interval": 1000})
    original = TrainStream.__next__
    batches = {"n": 0}

    def changed_after_three_batches(self):  # another program touches the file
        batches["n"] += 1
        if batches["n"] == 4:
            corpus.unlink() if change == "delete" else corpus.write_text("First Citizen:\n")
        return original(self)

    monkeypatch.setattr(TrainStream, "__next__", changed_after_three_batches)
    line = one_error_line(capsys, "train", recipe)
    expected = "was deleted during the run" if change == "delete" else \
        "changed during the run (size 2000 -> 15 bytes)"
    assert line.startswith(f"hftrain: error: data file {corpus} {expected}")
    assert run_dir.is_dir()  # it stopped mid-run, not while checking the inputs
    assert not (run_dir / "final").exists()  # no model of data that moved under it


def test_validation_start_notices_a_rewritten_file(tmp_path, corpus_file, shakespeare_text):
    from hftrain.recipe import TokenizerConfig
    from hftrain.tokenizer import build_tokenizer

    val = tmp_path / "val.txt"
    val.write_text(shakespeare_text[:3000])
    config = DataConfig(train_files=[str(corpus_file)], val_files=[str(val)], block_size=16)
    tok = build_tokenizer(TokenizerConfig(kind="char"), [shakespeare_text], 16)
    streams = DataStreams(config, tok, seed=0)
    next(streams.train_batches(4))
    streams.check_val(4)
    val.write_text(shakespeare_text[3000:6000])  # same size, other text
    with pytest.raises(DataError, match=f"data file {val} changed during the run "
                                        r"\(rewritten at the same size, 3000 bytes\)"):
        next(streams.val_batches(4))


@pytest.mark.parametrize(("argv", "expected"), [
    (["--top-p", "-1"], "argument --top-p: must be > 0 and <= 1, got -1"),
    (["--top-p", "2"], "argument --top-p: must be > 0 and <= 1, got 2"),
    (["--top-k", "-1"], "argument --top-k: must be at least 1, got -1"),
    (["--max-new-tokens", "-5"], "argument --max-new-tokens: must be at least 1, got -5"),
    (["--temperature", "-1"], "argument --temperature: must be a finite number >= 0"),
    (["--temperature", "nan"], "argument --temperature: must be a finite number >= 0"),
    (["--num-samples", "0"], "argument --num-samples: must be at least 1, got 0"),
])
def test_generate_rejects_out_of_range_values_in_one_line(export, capsys, argv, expected):
    line = one_error_line(capsys, "generate", export, *argv)
    assert line.startswith(f"hftrain: error: {expected}")
    assert line.endswith("(see hftrain generate --help)")


@pytest.mark.parametrize("edges", [["--top-p", "1", "--top-k", "1"], ["--temperature", "0"]])
def test_generate_still_accepts_the_edges_of_the_ranges(export, capsys, edges):
    main(["generate", str(export), "--prompt", "ROMEO:", "--max-new-tokens", "1", *edges])
    out, err = capsys.readouterr()
    assert out.startswith("ROMEO:") and err == ""


@pytest.mark.parametrize(("argv", "expected"), [
    (["--stride", "0"], "argument --stride: must be at least 1, got 0"),
    (["--block-size", "0"], "argument --block-size: must be at least 1, got 0"),
    (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["--batch-size", "x"], "argument --batch-size: expected a whole number, got 'x'"),
    (["--block-size", "100"], "--block-size 100 is more than the 64 positions of the model"),
    (["--block-size", "32", "--stride", "33"], "--stride 33 is more than the block size (32)"),
])
def test_eval_rejects_out_of_range_values_in_one_line(export, capsys, corpus_file, argv,
                                                      expected):
    line = one_error_line(capsys, "eval", export, "--data", corpus_file, *argv)
    assert line.startswith(f"hftrain: error: {expected}")


def test_eval_names_an_empty_or_binary_data_file(export, capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert one_error_line(capsys, "eval", export, "--data", empty) == \
        f"hftrain: error: no text to score in {empty}"
    binary = tmp_path / "weights.txt"
    binary.write_bytes(b"header\n" + bytes(range(128, 256)))
    line = one_error_line(capsys, "eval", export, "--data", binary)
    assert line.startswith(f"hftrain: error: {binary} line 2: not UTF-8 text (byte 0x80)")


def test_missing_or_wrong_export_folder_is_one_line(capsys, tmp_path, corpus_file):
    missing = tmp_path / "no-such-run" / "final"
    assert one_error_line(capsys, "generate", missing) == \
        f"hftrain: error: export folder not found: {missing}"
    line = one_error_line(capsys, "eval", tmp_path, "--data", corpus_file)
    assert line.startswith(f"hftrain: error: cannot load model '{tmp_path}'")


def test_argparse_mistakes_are_one_line(capsys):
    assert one_error_line(capsys, "generate") == ("hftrain: error: the following arguments are "
                                                  "required: export (see hftrain generate --help)")
    assert "invalid choice: 'trian'" in one_error_line(capsys, "trian", "recipe.yaml")


@pytest.mark.parametrize("failure", ["offline", "no network"])
def test_push_without_network_is_one_line_and_keeps_the_staged_folder(export, capsys, tmp_path,
                                                                       monkeypatch, failure):
    monkeypatch.setenv("HF_TOKEN", "hf_NotARealTokenForThisTest")
    if failure == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        expected = "(OfflineModeIsEnabled)"
    else:  # what a dead network raises: the HTTP client's ConnectError, not an HfHubHTTPError
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        client = sys.modules[HfHubHTTPError.__mro__[1].__module__]  # httpx2 (hub 2.x)

        def dead_network(*args, **kwargs):
            raise client.ConnectError("[Errno -2] Name or service not known")

        monkeypatch.setattr("huggingface_hub.HfApi.create_repo", dead_network)
        expected = "(ConnectError): [Errno -2] Name or service not known"
    folder = tmp_path / "hub"
    line = one_error_line(capsys, "push", export, "--repo-id", "me/tiny", "--folder", folder)
    assert line.startswith(f"hftrain: error: pushing to me/tiny failed {expected}")
    assert line.endswith(f"the staged folder is {folder}")
    assert (folder / "model.safetensors").is_file() and (folder / "README.md").is_file()


def test_a_hub_dataset_cannot_be_scanned_so_its_errors_name_the_dataset():
    from hftrain.data_check import Source, explain
    from hftrain.errors import RecordError

    source = Source("dataset someone/corpus", (), "", "text", "text")
    error = explain(RecordError("a row's text is null, not a string"), source)
    assert str(error) == "dataset someone/corpus: a row's text is null, not a string"


def test_a_bug_while_reading_data_stays_a_traceback(corpus_file, monkeypatch):
    """Only errors that come from the data become one line: a bug stays a traceback."""

    def broken(*args):
        yield "fine"
        raise KeyError("a bug, not the data")

    monkeypatch.setattr(data.sources, "_read", broken)
    with pytest.raises(KeyError):
        list(data.texts(DataConfig(train_files=[str(corpus_file)])))
