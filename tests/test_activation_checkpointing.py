"""Activation checkpointing (issue 23): `train.gradient_checkpointing: true` keeps only each
layer's input in the forward pass and recomputes the rest in the backward. It must change
memory and time only: the same losses as without it (dropout included), with LoRA too; a run
may switch it on resume (out of memory mid-run); recurrent models are refused in one line.
Under FSDP2: tests/test_sharded.py (its LoRA case checkpoints the FSDP side)."""

from __future__ import annotations

import json

import pytest
from conftest import cli, tiny_recipe_dict

from hftrain.recipe import recipe_from_dict
from hftrain.tracking import read_metrics
from hftrain.train import train

TINY = {"n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32}
MODELS = {
    "gpt2_dropout": {"arch": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.1},
    "llama": {"arch": "llama", **TINY},
    "qwen3_lora": {"arch": "qwen3", **TINY, "lora_r": 4},
}


def recipe(corpus, out, model: dict, **train_settings):
    data = tiny_recipe_dict(corpus, out, model=model,
                            train={"max_steps": 12, "log_interval": 2, **train_settings},
                            eval={"interval": 100, "max_batches": 2},
                            sample={"max_new_tokens": 0})
    return recipe_from_dict(data)


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize("name", MODELS)
def test_checkpointed_activations_give_the_losses_of_a_run_without(tmp_path, corpus_file, name):
    plain = train(recipe(corpus_file, tmp_path / "plain", MODELS[name]))
    checkpointed = train(recipe(corpus_file, tmp_path / "ckpt", MODELS[name],
                                gradient_checkpointing=True))
    assert len(losses(tmp_path / "ckpt")) == 6
    assert losses(tmp_path / "ckpt") == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)
    assert checkpointed.val["loss"] == pytest.approx(plain.val["loss"], rel=1e-5)
    config = json.loads((tmp_path / "ckpt" / "final" / "config.json").read_text())
    assert "gradient_checkpointing" not in config  # the export is a plain model
    assert plain.model.is_gradient_checkpointing is False


def test_the_setting_reaches_the_model(tmp_path, corpus_file, monkeypatch):
    """Checkpointing recomputes each decoder layer in the backward: its MLP runs twice a
    step. (The layer's own `forward` is transformers' checkpointing wrapper: left alone.)"""
    from transformers.models.llama import modeling_llama

    calls = {"n": 0}
    real_forward = modeling_llama.LlamaMLP.forward

    def counting(self, *args, **kwargs):
        calls["n"] += self.training
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", counting)
    train(recipe(corpus_file, tmp_path / "a", MODELS["llama"], max_steps=3))
    plain = calls["n"]
    calls["n"] = 0
    train(recipe(corpus_file, tmp_path / "b", MODELS["llama"], max_steps=3,
                 gradient_checkpointing=True))
    assert plain == 3 * 2 and calls["n"] == 2 * plain  # 2 layers x 3 steps, then recomputed


def test_a_run_out_of_memory_resumes_with_checkpointing_and_goes_on_as_before(
        tmp_path, corpus_file, capsys, monkeypatch):
    """Out of memory at step 8: `--resume train.gradient_checkpointing=true` continues from
    the step-6 checkpoint, and the run's losses are those of a run that never failed."""
    from hftrain.train_state import Run

    train(recipe(corpus_file, tmp_path / "whole", MODELS["llama"]))
    path = tmp_path / "r.yaml"
    data = tiny_recipe_dict(corpus_file, tmp_path / "run", model=MODELS["llama"],
                            train={"max_steps": 12, "log_interval": 2},
                            eval={"interval": 100, "max_batches": 2},
                            sample={"max_new_tokens": 0})
    data["checkpoint"] = {"interval": 3}
    path.write_text(json.dumps(data))
    real_step = Run.optimizer_step

    def out_of_memory_at_8(self, micro_batches):
        if self.step + 1 == 8:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, micro_batches)

    monkeypatch.setattr(Run, "optimizer_step", out_of_memory_at_8)
    with pytest.raises(RuntimeError, match="out of memory"):
        cli(["train", str(path)], capsys)
    monkeypatch.setattr(Run, "optimizer_step", real_step)
    code, out, err = cli(["train", str(path), "train.gradient_checkpointing=true", "--resume"],
                         capsys)
    assert code == 0, err
    assert "resumed from" in out and "at step 6" in out
    assert losses(tmp_path / "run") == pytest.approx(losses(tmp_path / "whole"), rel=1e-5)


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_recurrent_models_refuse_it_in_one_line(tmp_path, corpus_file, capsys, arch):
    path = tmp_path / "r.yaml"
    data = tiny_recipe_dict(corpus_file, tmp_path / "run",
                            train={"gradient_checkpointing": True})
    data["model"] = {"arch": arch, "embedding_size": 8, "hidden_size": 8, "num_layers": 1}
    path.write_text(json.dumps(data))
    code, _, err = cli(["train", str(path)], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "train.gradient_checkpointing" in lines[0] and "data.block_size" in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # inductor compiles each side for a minute on a 2-core CPU
def test_compiled_and_checkpointed_gives_the_losses_of_compiled(tmp_path, corpus_file):
    train(recipe(corpus_file, tmp_path / "plain", MODELS["llama"], max_steps=6, compile=True))
    train(recipe(corpus_file, tmp_path / "ckpt", MODELS["llama"], max_steps=6, compile=True,
                 gradient_checkpointing=True))
    assert len(losses(tmp_path / "ckpt")) == 3
    assert losses(tmp_path / "ckpt") == pytest.approx(losses(tmp_path / "plain"), rel=1e-4)
