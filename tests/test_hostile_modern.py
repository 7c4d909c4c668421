"""Hostile probes of the Llama-style archs (llama, qwen3) and the optimizers (issue 13): resume
after a stop equals the uninterrupted run in the awkward combinations (Muon with LoRA,
`init_from`, gradient accumulation, a GRU, `on_nan: skip`), torchrun ranks agree under Muon,
untied exports work everywhere, and bad or nonsensical settings are one line with nothing
written."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, cli, logits_of, on_cpu_if_multi_process
from safetensors.torch import load_file

from hftrain.recipe import recipe_from_dict
from hftrain.tracking import read_metrics
from hftrain.train import train
from hftrain.train_state import Run

LLAMA = {"arch": "llama", "n_layer": 1, "n_head": 4, "n_kv_head": 2, "n_embd": 32}


@pytest.fixture(scope="module")
def files(tmp_path_factory, shakespeare_text) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    (root / "train.txt").write_text(shakespeare_text[:8_000])
    (root / "val.txt").write_text(shakespeare_text[8_000:9_600])
    return {"root": root, "train": root / "train.txt", "val": root / "val.txt"}


def recipe(files: dict[str, Path], out: Path, model: dict | None = None, **train_fields) -> dict:
    """A llama that trains 4 steps of 4 x 16 tokens with Muon in well under a second."""
    return {
        "run": {"output_dir": str(out), "seed": 0, "trackers": []},
        "tokenizer": {"kind": "char"},
        "data": {"train_files": [str(files["train"])], "val_files": [str(files["val"])],
                 "block_size": 16, "shuffle_tokens": 1024, "num_workers": 0},
        "model": dict(model or LLAMA),
        "train": {"batch_size": 4, "max_steps": 4, "lr": 3e-3, "min_lr": 3e-4,
                  "warmup_steps": 1, "log_interval": 1, "optimizer": "muon", **train_fields},
        "eval": {"interval": 100, "batch_size": 8, "max_batches": 1},
        "sample": {"max_new_tokens": 0},
    }


def write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def llama_export(files) -> Path:
    """A tiny llama export (tied embeddings) to fine-tune from."""
    return train(recipe_from_dict(recipe(files, files["root"] / "src", optimizer="adamw",
                                         max_steps=10))).final_dir


def run_stopping_at(data: dict, stop_at: int | None = None):
    """`train` in this process; with `stop_at`, SIGTERM arrives during that step (the run
    checkpoints it and stops, as on a preempted machine)."""
    original = Run.optimizer_step

    def stopping(self, micro_batches):
        if self.step + 1 == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, micro_batches)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Run, "optimizer_step", stopping)
        return train(recipe_from_dict(copy.deepcopy(data)))


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


RESUME_CASES = {
    "muon_lora": ({**LLAMA, "lora_r": 2}, {}),
    "muon_grad_accum": ({**LLAMA, "arch": "qwen3", "tie_embeddings": False},
                        {"grad_accum_steps": 2}),
    "muon_gru": ({"arch": "gru", "embedding_size": 16, "hidden_size": 24, "num_layers": 2}, {}),
    "muon_on_nan_skip": (LLAMA, {"on_nan": "skip"}),
    "muon_init_from_lora": (None, {}),  # filled with the export below
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_a_stopped_and_resumed_run_equals_the_uninterrupted_one(case, files, llama_export,
                                                                  tmp_path):
    model, train_fields = RESUME_CASES[case]
    if model is None:
        model = {"arch": "llama", "init_from": str(llama_export), "lora_r": 2}
    whole = recipe(files, tmp_path / "whole", model, **train_fields)
    assert run_stopping_at(whole).step == 4
    part = recipe(files, tmp_path / "part", model, **train_fields)
    stopped = run_stopping_at(part, stop_at=2)
    assert stopped.interrupted and stopped.step == 2
    part["checkpoint"] = {"resume": "auto"}
    resumed = run_stopping_at(part)
    assert (resumed.step, resumed.steps_run) == (4, 2)
    ours, theirs = weights(tmp_path / "part"), weights(tmp_path / "whole")
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert torch.equal(ours[name], value), name
    losses = [[r["loss"] for r in read_metrics(d / "metrics.jsonl") if "loss" in r]
              for d in (tmp_path / "part", tmp_path / "whole")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_changing_the_optimizer_on_resume_is_refused_in_one_line(files, tmp_path, capsys):
    data = recipe(files, tmp_path / "run", max_steps=2)
    data["checkpoint"] = {"interval": 1}
    path = write(tmp_path / "r.yaml", data)
    assert cli(["train", str(path)], capsys)[0] == 0
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    code, _, err = cli(["train", str(path), "train.optimizer=adamw", "train.max_steps=4",
                        "--resume"], capsys)
    lines = [line for line in err.splitlines() if line.startswith("hftrain")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert "train.optimizer ('muon' -> 'adamw')" in lines[0]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before


RANK_HASH = """
import hashlib, os, sys
import hftrain.train as T
from hftrain.cli import main
original = T.fit
def recording(run, stop):
    result = original(run, stop)
    h = hashlib.sha1()
    for name, value in sorted(run.bare_model().state_dict().items()):
        h.update(name.encode()); h.update(value.detach().contiguous().numpy().tobytes())
    with open(os.path.join(sys.argv[1], "rank" + os.environ["RANK"]), "w") as f:
        f.write(h.hexdigest())
    return result
T.fit = recording
main(sys.argv[2:])
"""


def test_torchrun_two_processes_with_muon_end_with_equal_weights(files, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    script = tmp_path / "ranks.py"
    script.write_text(RANK_HASH)
    path = write(tmp_path / "r.yaml", recipe(files, tmp_path / "run", grad_accum_steps=2))
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", str(script), str(tmp_path),
                           "train", str(path)], capture_output=True, text=True, cwd=REPO,
                          timeout=120, env=on_cpu_if_multi_process(["--nproc_per_node", "2"], None))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 processes on cpu, MULTI_CPU (gloo)" in proc.stdout
    hashes = [(tmp_path / f"rank{r}").read_text() for r in (0, 1)]
    assert hashes[0] == hashes[1]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


LOAD_WITHOUT_HFTRAIN = """
import json, sys
sys.modules["hftrain"] = None
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = torch.tensor([[1, 5, 6, 7, 8]])
print(json.dumps({"class": type(model).__name__,
                  "tied": model.lm_head.weight is model.model.embed_tokens.weight,
                  "logits": model(input_ids=ids).logits[0, -1, :4].tolist()}))
"""


def test_an_untied_qwen3_trained_with_muon_exports_loads_generates_evals_and_pushes(
        files, tmp_path, capsys):
    result = train(recipe_from_dict(recipe(files, tmp_path / "run",
                                           {**LLAMA, "arch": "qwen3", "tie_embeddings": False})))
    final = result.final_dir
    proc = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_HFTRAIN, str(final)],
                          capture_output=True, text=True, check=True)
    got = json.loads(proc.stdout)
    assert got["class"] == "Qwen3ForCausalLM" and not got["tied"]
    ours = logits_of(result.model, torch.tensor([[1, 5, 6, 7, 8]]))[0, -1, :4]
    assert got["logits"] == pytest.approx(ours.tolist(), abs=1e-5)
    code, out, _ = cli(["generate", str(final), "--prompt", "ROMEO:", "--max-new-tokens", "20",
                        "--num-samples", "2", "--seed", "0"], capsys)
    assert code == 0 and out.count("ROMEO:") == 2
    code, out, _ = cli(["eval", str(final), "--data", str(files["val"])], capsys)
    assert code == 0
    assert float(out.split("loss ")[1].split(" ")[0]) == pytest.approx(result.val["loss"],
                                                                       abs=1e-4)
    code, _, _ = cli(["push", str(final), "--repo-id", "me/q", "--dry-run", "--folder",
                      str(tmp_path / "hub")], capsys)
    card = (tmp_path / "hub" / "README.md").read_text()
    assert code == 0 and "qwen3: 1 layers, 4 heads (2 key-value), width 32" in card
    assert "trust_remote_code" not in card


def test_init_from_a_llama_into_a_qwen3_recipe_is_one_line_and_writes_nothing(
        files, llama_export, tmp_path, capsys):
    path = write(tmp_path / "r.yaml", recipe(files, tmp_path / "run"))
    code, _, err = cli(["train", str(path), "model.arch=qwen3",
                        f"model.init_from={llama_export}"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "holds a 'llama' model" in lines[0]
    assert not (tmp_path / "run").exists()


# --- bugs ------------------------------------------------------------------------------------


def refused_in_one_line(err: str, key: str, path: Path) -> bool:
    lines = [line for line in err.splitlines() if line.startswith("hftrain: error:")]
    return len(lines) == 1 and key in lines[0] and str(path) in lines[0] \
        and "Traceback" not in err


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None,
                    reason="flash-attn is installed here")
def test_flash_attention_without_the_package_is_one_line(files, tmp_path, capsys):
    path = write(tmp_path / "r.yaml", recipe(files, tmp_path / "run"))
    code, _, err = cli(["train", str(path), "model.attn_implementation=flash_attention_2"],
                       capsys)
    assert code == 2 and refused_in_one_line(err, "model.attn_implementation", path)
    assert not (tmp_path / "run").exists()


def test_flash_attention_without_bf16_or_fp16_is_one_line(files, tmp_path, capsys,
                                                         monkeypatch):
    """With flash-attn present (pretended here) but the run in fp32, the first forward would
    fail inside flash-attn: refused before anything is written."""
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    path = write(tmp_path / "r.yaml", recipe(files, tmp_path / "run"))
    code, _, err = cli(["train", str(path), "model.attn_implementation=flash_attention_2"],
                       capsys)
    assert code == 2 and refused_in_one_line(err, "model.attn_implementation", path)
    assert "runs in bf16 or fp16 only" in err and "'no'" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_lora_on_a_tied_embedding_exports_the_model_it_trained(files, llama_export, target,
                                                              tmp_path, capsys):
    """During training the adapter changes only the module it wraps (the input embedding or
    the output head); merging folds it into the shared matrix, so the export's other end
    changes too. Either refuse the combination in one line or export what was trained."""
    model = {"arch": "llama", "init_from": str(llama_export), "lora_r": 4,
             "lora_target_modules": [target]}
    path = write(tmp_path / "r.yaml", recipe(files, tmp_path / "run", model, optimizer="adamw",
                                             lr=0.05, min_lr=0.005, max_steps=8))
    code, _, err = cli(["train", str(path)], capsys)
    if code == 2:  # refused: fine, if it says why in one line and writes nothing
        assert refused_in_one_line(err, "model.lora_target_modules", path)
        assert not (tmp_path / "run").exists()
        return
    assert code == 0, err
    trained = [r["val_loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
               if "val_loss" in r][-1]
    code, out, _ = cli(["eval", str(tmp_path / "run" / "final"), "--data", str(files["val"])],
                       capsys)
    assert code == 0
    assert float(out.split("loss ")[1].split(" ")[0]) == pytest.approx(trained, abs=1e-3)


@pytest.mark.parametrize("override", [
    ["train.optimizer=adafactor", "train.lr=10", "train.min_lr=1"],  # "lr only caps the step"
    ["train.muon_weight_decay=50"],  # x muon_lr 0.02 = 1: every Muon matrix wiped each step
    ["train.optimizer=sgd", "train.lr=20", "train.min_lr=0"],  # L2 0.1 x 20: flips each step
])
def test_a_weight_decay_that_erases_the_weights_is_refused(files, tmp_path, capsys, override):
    path = write(tmp_path / "r.yaml", recipe(files, tmp_path / "run"))
    code, _, err = cli(["train", str(path), *override, "train.max_steps=1"], capsys)
    assert code == 2 and "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("hftrain: error:")]
    assert len(line) == 1 and str(path) in line[0] and "weight_decay" in line[0]
    assert not (tmp_path / "run").exists()


def test_muon_decay_is_checked_at_gpt2s_scaled_matrix_rates(files, tmp_path, capsys):
    """GPT-2's c_fc takes Muon at 2 x muon_lr (its Conv1D layout): 0.02 x 30 passes the
    recipe's check, but 1 - 2 x 0.6 < 0 would flip that matrix each step."""
    model = {"arch": "gpt2", "n_layer": 1, "n_head": 4, "n_embd": 32}
    path = write(tmp_path / "r.yaml", recipe(files, tmp_path / "run", model,
                                             muon_weight_decay=30))
    code, _, err = cli(["train", str(path)], capsys)
    assert code == 2 and refused_in_one_line(err, "train.muon_weight_decay", path)
    assert not (tmp_path / "run").exists()


def test_a_rope_theta_that_underflows_is_refused_before_the_run_starts(files, tmp_path,
                                                                      capsys):
    path = write(tmp_path / "r.yaml", recipe(files, tmp_path / "run"))
    code, _, err = cli(["train", str(path), "model.rope_theta=1e-300"], capsys)
    assert code == 2 and refused_in_one_line(err, "model.rope_theta", path)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_nesterov_with_an_optimizer_without_it_is_refused(files, tmp_path, capsys, optimizer):
    path = write(tmp_path / "r.yaml", recipe(files, tmp_path / "run"))
    code, _, err = cli(["train", str(path), f"train.optimizer={optimizer}",
                        "train.nesterov=true", "train.momentum=0.9", "train.max_steps=1"],
                       capsys)
    assert code == 2 and refused_in_one_line(err, "train.nesterov", path)
    assert not (tmp_path / "run").exists()


def test_muon_with_nothing_for_muon_names_the_key_and_the_file(files, tmp_path, capsys):
    model = {**LLAMA, "tie_embeddings": False, "lora_r": 2,
             "lora_target_modules": ["embed_tokens"]}  # only embedding adapters: AdamW's
    path = write(tmp_path / "r.yaml", recipe(files, tmp_path / "run", model))
    code, _, err = cli(["train", str(path)], capsys)
    assert not (tmp_path / "run").exists()
    assert code == 2 and refused_in_one_line(err, "train.optimizer", path)


def test_the_card_of_a_muon_run_gives_the_muon_learning_rate(files, tmp_path, capsys):
    result = train(recipe_from_dict(recipe(files, tmp_path / "run", max_steps=2,
                                           muon_lr=0.037)))
    code, _, _ = cli(["push", str(result.final_dir), "--repo-id", "me/m", "--dry-run",
                      "--folder", str(tmp_path / "hub")], capsys)
    assert code == 0
    row = next(line for line in (tmp_path / "hub" / "README.md").read_text().splitlines()
               if line.startswith("| optimizer"))
    assert "0.037" in row, row

