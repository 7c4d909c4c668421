"""Weighted mixtures of sources (issue 23, `data.sources`): blocks drawn in proportion to the
weights, an exact position (resume equals the uninterrupted stream on 1 and 2 processes,
streamed and cached), one source equal to the data section alone, per-source token counts
and validation in metrics.jsonl, and one-line refusals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, cli, run_or_dump, tiny_recipe_dict
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

import hftrain.data.sources as sources
from hftrain.checkpoint import latest_checkpoint
from hftrain.data import DataStreams
from hftrain.data.cache import prepare
from hftrain.hub import model_card
from hftrain.recipe import DataConfig, SourceConfig, TokenizerConfig
from hftrain.tokenizer import build_tokenizer
from hftrain.tracking import read_metrics

FAULTS = REPO / "tests" / "fault_injection.py"


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, shakespeare_text) -> dict[str, list[Path]]:
    """Three sources of two files each, told apart by their letters: Shakespeare in capitals,
    in small letters, and with its letters replaced by digits."""
    folder = tmp_path_factory.mktemp("corpora")
    half = len(shakespeare_text) // 2
    texts = {"upper": shakespeare_text.upper(), "lower": shakespeare_text.lower(),
             "digits": "".join(str(ord(c) % 10) if c.isalpha() else c
                               for c in shakespeare_text)}
    files = {}
    for name, text in texts.items():
        files[name] = [folder / f"{name}-{i}.txt" for i in range(2)]
        files[name][0].write_text(text[:half])
        files[name][1].write_text(text[half:])
    return files


@pytest.fixture(scope="module")
def tok(corpora):
    text = "".join(p.read_text() for paths in corpora.values() for p in paths)
    return build_tokenizer(TokenizerConfig(kind="char"), [text], 16)


def source_of(block: list[int], tok) -> str:
    text = tok.decode(block, skip_special_tokens=True)
    if any(c.isupper() for c in text):
        return "upper"
    if any(c.islower() for c in text):
        return "lower"
    return "digits"


def mixture(corpora, weights: dict[str, float], **data) -> DataConfig:
    return DataConfig(block_size=16, shuffle_tokens=16 * 24, num_workers=0, sources=[
        SourceConfig(name=name, weight=weight, train_files=[str(p) for p in corpora[name]])
        for name, weight in weights.items()], **data)


def checkpointed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A stream position as a resumed process reads it: written to safetensors, read back."""
    return load_tensors(save_tensors({k: v.contiguous() for k, v in state.items()}))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("weights", [{"upper": 0.7, "lower": 0.3},
                                     {"upper": 5, "lower": 3, "digits": 2}])
def test_blocks_come_from_the_sources_in_proportion_to_their_weights(corpora, tok, weights):
    """10,000 blocks (100 batches of 100) over corpora of ~1,100 blocks each: every source
    is read for several epochs, and its share stays within 2% of its weight's."""
    stream = DataStreams(mixture(corpora, weights), tok, seed=3).train_batches(100)
    counts = dict.fromkeys(weights, 0)
    for _ in range(100):
        batch = next(stream)
        for ids in batch["input_ids"].tolist():
            counts[source_of(ids, tok)] += 1
    total = sum(weights.values())
    for name, weight in weights.items():
        assert abs(counts[name] / 10_000 - weight / total) < 0.02, (name, counts)
    tokens, epochs = stream.report()
    assert tokens == {name: n * 16 for name, n in counts.items()}
    assert all(e > 1 for e in epochs.values())  # several epochs of each


@pytest.mark.parametrize("cached", [False, True], ids=["stream", "cache"])
def test_one_source_gives_the_batches_of_the_data_section_alone(corpora, tok, tmp_path,
                                                                cached):
    files = [str(p) for p in corpora["upper"]]
    cache = {"cache": str(tmp_path / "cache")} if cached else {}
    alone = DataConfig(block_size=16, shuffle_tokens=16 * 24, num_workers=0,
                       train_files=files, **({"cache": str(tmp_path / "alone")}
                                             if cached else {}))
    one = mixture(corpora, {"upper": 2.5}, **cache)
    if cached:
        prepare(alone, tok, show_progress=False)
        prepare(one.by_source()[0], tok, show_progress=False)
        assert (tmp_path / "cache" / "upper" / "train.bin").is_file()
    plain = DataStreams(alone, tok, seed=5).train_batches(6)
    mixed = DataStreams(one, tok, seed=5).train_batches(6)
    for _ in range(60):  # past the first epoch
        assert same(next(plain), next(mixed))


def streams(config: DataConfig, tok, world_size: int):
    return [DataStreams(config, tok, seed=11, rank=r, world_size=world_size).train_batches(4)
            for r in range(world_size)]


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("cached", [False, True], ids=["stream", "cache"])
def test_a_restored_mixture_position_continues_exactly(corpora, tok, tmp_path, monkeypatch,
                                                       world_size, cached):
    """Each rank's position saved mid-run (after a step rolled back half-way, as a failed
    step leaves it), written and read back, continues with the batches the uninterrupted
    stream gives; the ranks read disjoint blocks."""
    monkeypatch.setattr(sources, "PIECE_BYTES", 2048)  # several pieces a file: 2 ranks share
    config = mixture(corpora, {"upper": 0.6, "lower": 0.4},
                     **({"cache": str(tmp_path / "cache")} if cached else {}))
    if cached:
        for alone in config.by_source():
            prepare(alone, tok, show_progress=False)
    whole = streams(config, tok, world_size)
    saved = []
    for stream in whole:
        for _ in range(37):
            next(stream)
        stream.begin_step()
        next(stream)
        stream.rollback_step()  # the step failed after one micro-batch: not counted
        saved.append(checkpointed(stream.state_dict()))
    resumed = streams(config, tok, world_size)
    seen: list[set[tuple[int, ...]]] = [set() for _ in range(world_size)]
    for rank, (stream, state) in enumerate(zip(resumed, saved, strict=True)):
        stream.load_state_dict(state)
        for _ in range(80):
            batch = next(whole[rank])
            assert same(batch, next(stream))
            seen[rank].update(tuple(ids) for ids in batch["input_ids"].tolist())
    if world_size == 2:
        assert len(seen[0] & seen[1]) < 0.05 * len(seen[0])  # text repeats a little


def test_a_position_of_other_sources_is_refused(corpora, tok):
    from hftrain.errors import DataError

    two = streams(mixture(corpora, {"upper": 1, "lower": 1}), tok, 1)[0]
    other = streams(mixture(corpora, {"upper": 1, "digits": 1}), tok, 1)[0]
    with pytest.raises(DataError, match="not of a mixture of the sources upper, digits"):
        other.load_state_dict(two.state_dict())


def recipe_file(tmp_path: Path, corpora, name: str, **data) -> Path:
    recipe = tiny_recipe_dict(corpora["upper"][0], tmp_path / name,
                              train={"max_steps": 24, "log_interval": 4},
                              eval={"interval": 12, "max_batches": 2},
                              sample={"max_new_tokens": 0})
    del recipe["data"]["train_files"]
    recipe["data"].update({"num_workers": 0, "sources": [
        {"name": "upper", "weight": 3, "train_files": [str(p) for p in corpora["upper"]]},
        {"name": "lower", "weight": 1, "train_files": [str(p) for p in corpora["lower"]],
         "val_fraction": 0.2}], **data})
    recipe["checkpoint"] = {"interval": 8}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(recipe))
    return path


def test_a_mixture_run_logs_each_sources_tokens_and_validation(tmp_path, corpora, capsys):
    code, out, err = cli(["train", str(recipe_file(tmp_path, corpora, "run"))], capsys)
    assert code == 0, err
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    for record in train:
        assert record["tokens/upper"] + record["tokens/lower"] == record["tokens"]
    assert train[-1]["tokens/upper"] / train[-1]["tokens"] == pytest.approx(0.75, abs=0.1)
    assert 0 < train[-1]["epochs/lower"] < train[-1]["epochs/upper"]
    final = [r for r in records if "val_loss" in r][-1]
    by_tokens = (final["val_loss/upper"] * final["val_tokens/upper"]
                 + final["val_loss/lower"] * final["val_tokens/lower"]) / final["val_tokens"]
    assert final["val_loss"] == pytest.approx(by_tokens, rel=1e-6)  # all tokens together
    assert final["val_tokens/upper"] + final["val_tokens/lower"] == final["val_tokens"]
    assert f"| upper {final['val_loss/upper']:.4f} | lower {final['val_loss/lower']:.4f}" \
        in out
    vocab = json.loads((tmp_path / "run" / "final" / "tokenizer.json").read_text())
    assert {"Q", "q"} <= set(vocab["model"]["vocab"])  # learned from both sources
    card = str(model_card(tmp_path / "run" / "final", "user/mixed", final))
    assert "upper (weight 3.0): upper-0.txt, upper-1.txt; lower (weight 1.0)" in card
    assert f"; lower: loss {final['val_loss/lower']:.4f}, bits per byte" in card


def run_with_fault(record: Path, recipe: Path, kill_at_step: int = 0,
                   extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(FAULTS), str(record), str(kill_at_step), "0",
                           "--", "train", str(recipe), *extra],
                          capture_output=True, text=True, cwd=REPO)


def trained(record: Path) -> dict[int, str]:
    return dict(line.split() for line in record.read_text().splitlines())


@pytest.mark.parametrize("cached", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["stream", "cache"])  # (the cache's position: the test above)
def test_kill_9_then_resume_trains_on_the_blocks_of_the_uninterrupted_mixture(
        tmp_path, corpora, cached):
    cache = {"cache": str(tmp_path / "cache")} if cached else {}
    whole = run_with_fault(tmp_path / "whole.txt", recipe_file(tmp_path, corpora, "whole",
                                                                **cache))
    assert whole.returncode == 0, whole.stderr
    recipe = recipe_file(tmp_path, corpora, "killed", **cache)
    killed = run_with_fault(tmp_path / "killed.txt", recipe, kill_at_step=19)
    assert killed.returncode == -signal.SIGKILL
    assert latest_checkpoint(tmp_path / "killed").name == "step-00000016"
    resumed = run_with_fault(tmp_path / "killed.txt", recipe, extra=("--resume",))
    assert resumed.returncode == 0, resumed.stderr
    assert trained(tmp_path / "killed.txt") == trained(tmp_path / "whole.txt")
    last = {r["step"]: r for r in read_metrics(tmp_path / "killed" / "metrics.jsonl")
            if "loss" in r}
    first = {r["step"]: r for r in read_metrics(tmp_path / "whole" / "metrics.jsonl")
             if "loss" in r}
    assert last[24]["tokens/lower"] == first[24]["tokens/lower"]
    assert last[24]["loss"] == pytest.approx(first[24]["loss"], rel=1e-5)


def test_prepare_builds_one_cache_per_source(tmp_path, corpora, capsys):
    recipe = recipe_file(tmp_path, corpora, "run", cache=str(tmp_path / "cache"))
    code, out, err = cli(["prepare", str(recipe)], capsys)
    assert code == 0, err
    for name in ("upper", "lower"):
        assert f"token cache {tmp_path / 'cache' / name}: train" in out
        assert (tmp_path / "cache" / name / "hftrain_cache.json").is_file()


@pytest.mark.parametrize("data, message", [
    ({"train_files": ["x.txt"]}, "data.sources replaces data.train_files: each source says"),
    ({"val_fraction": 0.5, "sample_by": "line"},
     "data.sources replaces data.val_fraction, data.sample_by: each source says"),
    ({"sources": [{"name": "a", "train_files": ["x"], "weight": 0}]},
     "data.sources[0].weight must be > 0"),
    ({"sources": [{"name": "a", "train_files": ["x"], "weight": float("nan")}]},
     "data.sources[0].weight must be a finite number"),
    ({"sources": [{"name": "a b", "train_files": ["x"]}]},
     "data.sources[0].name must be letters, digits"),
    ({"sources": [{"name": "a", "train_files": ["x"]}, {"name": "a", "dataset": "u/d"}]},
     "data.sources names 'a' twice"),
    ({"sources": [{"name": "Ab", "train_files": ["x"]}, {"name": "aB", "train_files": ["y"]}]},
     "data.sources names 'Ab' twice (in any case"),
    ({"sources": [{"name": "a"}]}, "data.sources[0]: needs train_files or dataset"),
    ({"sources": "x.txt"}, "data.sources expects a list of mappings"),
    ({"sources": [{"name": "a", "train_files": ["x"], "wieght": 2}]},
     "unknown key 'data.sources[0].wieght' (did you mean 'data.sources[0].weight'?)"),
])
def test_a_wrong_source_is_one_line_naming_the_key(tmp_path, corpora, capsys, data, message):
    recipe = json.loads(recipe_file(tmp_path, corpora, "run").read_text())
    recipe["data"].pop("sources")
    recipe["data"].update(data)
    if "sources" not in data:
        recipe["data"]["sources"] = [{"name": "a", "train_files": ["y.txt"]}]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))  # (YAML: .nan)
    code, out, err = cli(["train", str(path)], capsys)
    assert code == 2
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_a_bad_record_in_a_source_is_named_by_file_and_line(tmp_path, corpora, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": null}\n' * 50)
    recipe = json.loads(recipe_file(tmp_path, corpora, "run").read_text())
    recipe["data"]["sources"][1]["train_files"] = [str(bad)]
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(recipe))
    code, out, err = cli(["train", str(path)], capsys)
    assert code == 2
    assert f"{bad} line 2: 'text' is null" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run" / "final").exists()


def test_a_run_folder_holding_a_sources_data_is_refused(tmp_path, corpora, capsys):
    recipe = json.loads(recipe_file(tmp_path, corpora, "run").read_text())
    recipe["run"]["output_dir"] = str(corpora["lower"][0].parent)
    path = tmp_path / "into-data.yaml"
    path.write_text(json.dumps(recipe))
    code, out, err = cli(["train", str(path)], capsys)
    assert code == 2 and "run.output_dir" in err, err
    assert all(p.is_file() for paths in corpora.values() for p in paths)


def test_weights_near_the_float_limit_still_share_the_blocks(corpora, tok):
    huge = mixture(corpora, {"upper": 1e308, "lower": 1e308})
    stream = DataStreams(huge, tok, seed=3).train_batches(100)
    for _ in range(10):
        next(stream)
    tokens, _ = stream.report()
    assert abs(tokens["upper"] / (tokens["upper"] + tokens["lower"]) - 0.5) < 0.05, tokens


def test_epochs_of_unpacked_examples_count_examples(tmp_path, tok):
    """One example per block: an epoch is as many blocks as examples, however long each."""
    records = [{"prompt": f"Q{i}: ", "completion": "yes " * (i % 7)} for i in range(40)]
    files = {}
    for name in ("a", "b"):
        files[name] = [tmp_path / f"{name}.jsonl"]
        files[name][0].write_text("".join(json.dumps(r) + "\n" for r in records))
    config = mixture(files, {"a": 1, "b": 1}, kind="sft", packing=False)
    config = DataConfig(**{**config.__dict__, "sources": [
        SourceConfig(**{**s.__dict__, "val_fraction": 0.0, "val_files": [str(files["a"][0])]})
        for s in config.sources]})
    stream = DataStreams(config, tok, seed=3).train_batches(10)
    for _ in range(16):  # 160 examples drawn, 80 of each on average
        next(stream)
    tokens, epochs = stream.report()
    for name in ("a", "b"):
        assert epochs[name] == pytest.approx(tokens[name] / 16 / 40), (tokens, epochs)


def write(tmp_path: Path, recipe: dict, name: str = "changed") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_a_source_too_small_for_a_block_is_refused_before_anything_is_written(
        tmp_path, corpora, capsys):
    small = tmp_path / "small.txt"
    small.write_text("tiny")
    recipe = json.loads(recipe_file(tmp_path, corpora, "run").read_text())
    recipe["data"]["sources"].append({"name": "small", "weight": 0.001,
                                      "train_files": [str(small)],
                                      "val_files": [str(corpora["lower"][1])]})
    code, out, err = cli(["train", str(write(tmp_path, recipe))], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"data.sources[2] (small): the training corpus ({small}) has" in err
    assert not (tmp_path / "run").exists()


def test_a_missing_file_names_its_source(tmp_path, corpora, capsys):
    recipe = json.loads(recipe_file(tmp_path, corpora, "run").read_text())
    recipe["data"]["sources"][1]["train_files"] = [str(tmp_path / "nope.txt")]
    code, out, err = cli(["train", str(write(tmp_path, recipe))], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "data.sources[1] (lower): data file not found" in err


@pytest.mark.parametrize("mixed", [True, False], ids=["source", "data section"])
def test_a_hub_dataset_that_cannot_be_read_is_one_line(tmp_path, corpora, capsys, mixed):
    """Offline (as the tests run) or not on the Hub: one line naming the dataset, exit 2."""
    recipe = json.loads(recipe_file(tmp_path, corpora, "run").read_text())
    if mixed:
        recipe["data"]["sources"][1] = {"name": "hub", "dataset": "nobody-xyz/none"}
    else:
        recipe["data"].pop("sources")
        recipe["data"]["dataset"] = "nobody-xyz/none"
    code, out, err = cli(["train", str(write(tmp_path, recipe))], capsys)
    assert code == 2 and err.count("\n") == 1, err
    named = "data.sources[1] (hub): " if mixed else ""
    assert f"{named}data.dataset 'nobody-xyz/none' (split 'train') cannot be read" in err
    assert not (tmp_path / "run").exists()


def test_resume_names_the_changed_key_of_a_source_and_follows_moved_files(tmp_path, corpora,
                                                                          capsys):
    recipe = json.loads(recipe_file(tmp_path, corpora, "run").read_text())
    recipe["train"]["max_steps"] = 8
    assert cli(["train", str(write(tmp_path, recipe, "first"))], capsys)[0] == 0
    recipe["train"]["max_steps"] = 16
    recipe["data"]["sources"][0]["weight"] = 2
    code, out, err = cli(["train", str(write(tmp_path, recipe)), "--resume"], capsys)
    assert code == 2 and "data.sources[0].weight (3.0 -> 2.0)" in err, err
    assert len(err) < 400, err  # the key that changed, not every source's every setting
    recipe["data"]["sources"][0]["weight"] = 3
    moved = tmp_path / "moved"
    moved.mkdir()
    for i, path in enumerate(corpora["lower"]):
        (moved / path.name).write_bytes(path.read_bytes())
        recipe["data"]["sources"][1]["train_files"][i] = str(moved / path.name)
    code, out, err = cli(["train", str(write(tmp_path, recipe)), "--resume"], capsys)
    assert code == 0, err
    assert "data.sources[1].train_files moved since the checkpoint" in err


def test_a_mixture_cache_folder_holding_other_files_is_refused(tmp_path, corpora, capsys):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    recipe = recipe_file(tmp_path, corpora, "run", cache=str(foreign))
    code, out, err = cli(["train", str(recipe)], capsys)
    assert code == 2 and "holds notes.txt, which is not a token cache" in err, err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # two torchrun launches and a resume: a minute; the 2-rank position test
# above runs in the default suite
def test_two_process_kill_9_then_resume_trains_on_the_blocks_of_the_uninterrupted_mixture(
        tmp_path, corpora):
    torchrun = str(Path(sys.executable).with_name("torchrun"))

    def launch(name: str, kill_at_step: int, *extra: str) -> subprocess.CompletedProcess:
        recipe = recipe_file(tmp_path, corpora, name)
        return run_or_dump([torchrun, "--nproc_per_node", "2", str(FAULTS),
                            str(tmp_path / f"{name}.txt"), str(kill_at_step), "0", "--",
                            "train", str(recipe), *extra], 600, cwd=REPO)

    assert launch("whole", 0).returncode == 0
    assert launch("killed", 19).returncode != 0
    assert latest_checkpoint(tmp_path / "killed").name == "step-00000016"
    resumed = launch("killed", 0, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for rank in range(2):
        assert trained(tmp_path / f"killed.txt.rank{rank}") == \
            trained(tmp_path / f"whole.txt.rank{rank}")
    records = [r for r in read_metrics(tmp_path / "killed" / "metrics.jsonl") if "loss" in r]
    for record in records:  # both ranks' blocks, counted once
        assert record["tokens/upper"] + record["tokens/lower"] == record["tokens"]
