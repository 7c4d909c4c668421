"""`hftrain eval` (sliding windows, padding never scored, equal to in-training evaluation) and
`hftrain push` (the staged folder loads without hftrain, the card parses, the exact files are
uploaded and no token is written anywhere)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from accelerate import Accelerator
from conftest import tiny_recipe_dict

from hftrain.cli import main
from hftrain.data import IGNORE_INDEX
from hftrain.evaluation import evaluate_texts, text_windows
from hftrain.generation import load_export
from hftrain.recipe import recipe_from_dict
from hftrain.train import train

SECRET = "hf_NeverWriteThisTokenAnywhere0123456789"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shakespeare_text):
    """A tiny GPT-2 and a tiny LSTM, each validated on a separate file."""
    root = tmp_path_factory.mktemp("runs")
    (root / "train.txt").write_text(shakespeare_text[:16_000])
    (root / "val.txt").write_text(shakespeare_text[16_000:])
    result = {}
    for arch, model in (("gpt2", {}), ("lstm", {"arch": "lstm", "embedding_size": 16,
                                               "hidden_size": 24, "num_layers": 1})):
        raw = tiny_recipe_dict(root / "train.txt", root / arch,
                               data={"val_files": [str(root / "val.txt")]},
                               train={"max_steps": 100}, eval={"interval": 50})
        if model:
            raw["model"] = model
        result[arch] = train(recipe_from_dict(raw))
    result["val_file"] = root / "val.txt"
    return result


def run_eval(capsys, export: Path, *args: str) -> dict[str, float]:
    main(["eval", str(export), *args])
    line = capsys.readouterr().out.strip()
    loss = float(line.split("loss ")[1].split(" ")[0])
    tokens = int(line.split("| ")[-1].split(" tokens")[0].replace(",", ""))
    return {"loss": loss, "tokens": tokens}


@pytest.mark.parametrize("arch", ["gpt2", "lstm"])
def test_eval_command_equals_in_training_evaluation(runs, capsys, arch):
    result = runs[arch]
    got = run_eval(capsys, result.final_dir, "--data", str(runs["val_file"]),
                   "--trust-remote-code")
    assert got["tokens"] == result.val["tokens"]
    assert got["loss"] == pytest.approx(result.val["loss"], abs=1e-4)


@pytest.mark.parametrize(("block_size", "stride"), [(16, 16), (16, 5), (16, 1), (64, 64)])
def test_windows_score_every_target_once_with_at_least_block_minus_stride_context(block_size,
                                                                                    stride):
    ids = list(range(1000, 1000 + 50))
    n_bytes = [i % 7 for i in range(50)]
    scored, context, scored_bytes = [], [], 0
    for window in text_windows(np.array([ids, n_bytes]), block_size, stride):
        tokens, labels, counts = window
        for position in range(1, block_size + 1):
            if labels[position] != IGNORE_INDEX:
                scored.append(int(labels[position]))
                context.append(position)
                scored_bytes += int(counts[position])
                assert tokens[position] == labels[position]
    assert scored == ids[1:]  # each target once, in order
    assert scored_bytes == sum(n_bytes[1:])  # with the bytes it stands for
    for target, seen in zip(range(1, 50), context, strict=True):
        assert seen >= min(target, block_size - stride + 1)
    # the trained-model property (a smaller stride never scores worse) is checked on the
    # full Shakespeare recipe in test_recipes_slow.py


def test_a_batch_of_unequal_texts_equals_them_one_by_one(runs):
    model, tok = load_export(str(runs["gpt2"].final_dir))
    acc = Accelerator(cpu=True)
    val = runs["val_file"].read_text()
    texts = [val[:37], val[100:700], val[800:803], val[900:1250]]
    together = evaluate_texts(model, tok, texts, acc, block_size=16, stride=5, batch_size=8)
    alone = [evaluate_texts(model, tok, [t], acc, block_size=16, stride=5, batch_size=1)
             for t in texts]
    tokens = sum(r["tokens"] for r in alone)
    loss = sum(r["loss"] * r["tokens"] for r in alone) / tokens
    # every character of each text (the first after the start token) and its EOS
    assert together["tokens"] == tokens == sum(len(t) + 1 for t in texts)
    assert together["bytes"] == sum(len(t.encode()) for t in texts)
    assert together["loss"] == pytest.approx(loss, rel=1e-6)
    assert together["perplexity"] == pytest.approx(math.exp(loss), rel=1e-6)


LOAD_WITHOUT_HFTRAIN = """
import json, sys
sys.modules["hftrain"] = None
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, remote = sys.argv[1], sys.argv[2] == "1"
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote)
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote)
ids = tok("ROMEO:", return_tensors="pt").input_ids
print(json.dumps({"class": type(model).__name__,
                  "generated": model.generate(ids, max_new_tokens=5, do_sample=False).shape[1]}))
"""


@pytest.mark.parametrize("arch", ["gpt2", "lstm"])
def test_dry_run_folder_loads_without_hftrain_and_its_card_parses(runs, tmp_path, capsys,
                                                                  monkeypatch, arch):
    from huggingface_hub import ModelCard

    monkeypatch.setenv("HF_TOKEN", SECRET)
    folder = tmp_path / "hub"
    main(["push", str(runs[arch].final_dir), "--repo-id", f"me/tiny-{arch}", "--dry-run",
          "--folder", str(folder)])
    listed = capsys.readouterr().out
    assert "would upload" in listed and "README.md" in listed and "loss.png" in listed
    proc = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_HFTRAIN, str(folder),
                           "1" if arch == "lstm" else "0"],
                          capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout)["generated"] == len("ROMEO:") + 5
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers" and "hftrain" in card.data.tags
    result = card.data.eval_results[0]
    assert result.metric_type == "perplexity"
    assert result.metric_value == pytest.approx(runs[arch].val["perplexity"], rel=1e-3)
    assert ("trust_remote_code=True" in card.text) == (arch == "lstm")
    assert "| tokenizer | char |" in card.text


class RecordingApi:
    """Stands in for `huggingface_hub.HfApi`: records calls and the files of each upload."""

    calls: list = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, ignore_patterns=(), **kwargs):
        """Uploads what the real one would: the folder's files less `ignore_patterns`."""
        from fnmatch import fnmatch

        root = Path(folder_path)
        files = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()
                 and not any(fnmatch(str(p.relative_to(root)), pat) for pat in ignore_patterns)}
        self.calls.append(("upload_folder", repo_id, files))


def test_push_uploads_exactly_the_staged_files_and_never_the_token(runs, tmp_path, monkeypatch,
                                                                  capsys):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setattr("hftrain.hub.HfApi", RecordingApi)
    RecordingApi.calls = []
    main(["push", str(runs["lstm"].final_dir), "--repo-id", "me/tiny-lstm", "--private",
          "--folder", str(tmp_path / "hub")])
    (create, repo, kwargs), (upload, repo2, files) = RecordingApi.calls
    assert (create, repo, kwargs["private"]) == ("create_repo", "me/tiny-lstm", True)
    assert (upload, repo2) == ("upload_folder", "me/tiny-lstm")
    assert set(files) == {"README.md", "loss.png", "config.json", "model.safetensors",
                          "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                          "hftrain_recipe.yaml", "hftrain_run.json", "chat_template.jinja",
                          "configuration_recurrent.py", "modeling_recurrent.py"}
    for name, content in files.items():
        assert SECRET.encode() not in content, name
    assert SECRET not in capsys.readouterr().out


def test_recipe_hub_section_pushes_after_training(tmp_path, corpus_file, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setattr("hftrain.hub.HfApi", RecordingApi)
    RecordingApi.calls = []
    raw = tiny_recipe_dict(corpus_file, tmp_path / "run", train={"max_steps": 5})
    raw["hub"] = {"push_to_hub": True, "repo_id": "me/from-recipe"}
    result = train(recipe_from_dict(raw))
    (_, repo, kwargs), (_, _, files) = RecordingApi.calls
    assert repo == "me/from-recipe" and kwargs["private"] is False
    assert {"README.md", "model.safetensors", "hftrain_recipe.yaml"} <= set(files)
    recipe_text = (result.run_dir / "recipe.yaml").read_text()
    assert SECRET not in recipe_text and all(SECRET.encode() not in c for c in files.values())
