"""Preference tuning (DPO): pairs score only their completions, the loss equals TRL's
`DPOTrainer` on the same batch, a run from an export raises the held-out preference
accuracy, LoRA's reference is the model with its adapters disabled, a kill -9 resumes to the
uninterrupted run, and bad records or settings are refused in one line."""

from __future__ import annotations

import copy
import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import REPO, cli, tiny_recipe_dict
from test_checkpoint import run_with_fault, trained_steps

from hftrain.data import IGNORE_INDEX, DataStreams
from hftrain.data.packing import collate, pad_examples
from hftrain.dpo import DPOObjective, pair_logps
from hftrain.models import GPT2Fields, build_gpt2
from hftrain.preference import PAIR_ROWS, encode_pair
from hftrain.recipe import DataConfig, TokenizerConfig, recipe_from_dict
from hftrain.tokenizer import build_tokenizer
from hftrain.tracking import read_metrics
from hftrain.train import train

PAIRS = REPO / "recipes" / "data" / "shakespeare-pairs" / "preference.jsonl"


@pytest.fixture(scope="module")
def pairs() -> list[dict]:
    return [json.loads(line) for line in PAIRS.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tok(shakespeare_text):
    return build_tokenizer(TokenizerConfig(kind="char"), [shakespeare_text], 64)


def scored(tok, ids: np.ndarray, labels: np.ndarray) -> str:
    return tok.decode([int(i) for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])


def test_each_side_of_a_pair_scores_only_its_completion(tok):
    pair = encode_pair({"prompt": "ROMEO:\n", "chosen": "Speak.", "rejected": "Nay."}, tok)
    assert scored(tok, pair[0], pair[1]) == "Speak." + tok.eos_token
    assert scored(tok, pair[2], pair[3]) == "Nay." + tok.eos_token
    assert tok.decode([int(i) for i in pair[0]]) == f"{tok.bos_token}ROMEO:\nSpeak.{tok.eos_token}"

    user = {"role": "user", "content": "Speak."}
    said = [{"role": "assistant", "content": "Speak, speak."}, user]  # a turn in the prompt
    chat = {"prompt": [user, *said], "chosen": [{"role": "assistant", "content": "Resolved."}],
            "rejected": [{"role": "assistant", "content": "Famished."}]}
    pair = encode_pair(chat, tok)
    assert scored(tok, pair[0], pair[1]) == "Resolved." + tok.eos_token  # not the prompt's turn
    assert scored(tok, pair[2], pair[3]) == "Famished." + tok.eos_token
    # an implicit prompt (TRL's format without "prompt"): the messages both sides share
    implicit = {"chosen": chat["prompt"] + chat["chosen"],
                "rejected": chat["prompt"] + chat["rejected"]}
    assert np.array_equal(encode_pair(implicit, tok), pair)


def tiny_gpt2(tok, seed: int):
    torch.manual_seed(seed)
    return build_gpt2(GPT2Fields(n_layer=1, n_head=2, n_embd=32, dropout=0.0), tok, 128)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_the_loss_equals_trls_dpo_loss_on_the_same_batch(tmp_path, tok, pairs, beta):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    policy, reference = tiny_gpt2(tok, 0), tiny_gpt2(tok, 1)  # unlike: the loss is not log 2
    encoded = [encode_pair(p, tok) for p in pairs[:6]]
    batch = collate(list(pad_examples(encoded, 128)), 6, tok.pad_token_id, PAIR_ROWS)
    objective = DPOObjective(copy.deepcopy(reference), beta, Accelerator(cpu=True))
    loss_sum, stats = objective(copy.deepcopy(policy), batch)
    ours = loss_sum.detach() / objective.count(batch)

    def trl_example(pair: np.ndarray) -> dict:  # the same ids: prompt, then each completion
        chosen = pair[0][pair[0] != IGNORE_INDEX].tolist()
        rejected = pair[2][pair[2] != IGNORE_INDEX].tolist()
        start = int(np.argmax(pair[1] != IGNORE_INDEX))
        assert chosen[:start] == rejected[:start]
        return {"prompt_ids": chosen[:start], "chosen_ids": chosen[start:],
                "rejected_ids": rejected[start:]}

    trl_batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(
        [trl_example(p) for p in encoded])
    args = DPOConfig(output_dir=str(tmp_path), beta=beta, bf16=False, use_cpu=True,
                     report_to="none", max_length=None)
    trainer = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                         args=args, processing_class=tok,
                         train_dataset=Dataset.from_list(pairs[:1]))
    theirs = trainer.compute_loss(trainer.model, trl_batch)
    assert abs(float(ours) - float(theirs)) < 1e-5
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    with torch.no_grad():  # each side's summed log-probability, as TRL sums it
        chosen, rejected = pair_logps(policy, batch, "cpu").mean(-1).tolist()
    assert chosen == pytest.approx(logged["logps/chosen"], rel=1e-6)
    assert rejected == pytest.approx(logged["logps/rejected"], rel=1e-6)
    n = objective.count(batch)
    for i, name in enumerate(("rewards/chosen", "rewards/rejected", "rewards/accuracies",
                              "rewards/margins")):
        assert float(stats[i] / n) == pytest.approx(logged[name], abs=1e-5), name


def test_with_lora_the_reference_is_the_model_with_its_adapters_disabled(tok, pairs):
    from peft import LoraConfig, get_peft_model

    base = tiny_gpt2(tok, 0)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["c_attn"],
                                                           init_lora_weights=False))
    model.train()
    encoded = [encode_pair(p, tok) for p in pairs[:4]]
    batch = collate(list(pad_examples(encoded, 128)), 4, tok.pad_token_id, PAIR_ROWS)
    objective = DPOObjective(None, 0.1, Accelerator(cpu=True))
    with torch.no_grad():
        expected, adapted = pair_logps(base, batch, "cpu"), pair_logps(model, batch, "cpu")
    assert not torch.allclose(adapted, expected)  # the adapters change the model...
    assert torch.allclose(objective.reference_logps(model, batch), expected, atol=1e-5)
    assert model.training  # ...and the reference pass leaves it training, adapters on
    assert torch.allclose(pair_logps(model, batch, "cpu"), adapted, atol=1e-5)


def preference_file(tmp_path: Path, pairs: list[dict], n: int, reversed_words=False) -> Path:
    """The first `n` shipped pairs (rejected: two neighbouring words swapped); with
    `reversed_words`, the rejected side is the chosen line's words in reverse order instead,
    a preference a 1-layer model can learn in 30 steps."""
    if reversed_words:
        pairs = [{**p, "rejected": " ".join(p["chosen"].split()[::-1]) + "\n"} for p in pairs]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs[:n]), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base_export(tmp_path_factory, shakespeare_text) -> Path:
    """A tiny char GPT-2 trained on Shakespeare: what DPO starts from."""
    tmp = tmp_path_factory.mktemp("base")
    corpus = tmp / "corpus.txt"
    corpus.write_text(shakespeare_text, encoding="utf-8")
    recipe = tiny_recipe_dict(corpus, tmp / "base", data={"block_size": 128},
                              model={"n_embd": 48}, train={"max_steps": 150, "batch_size": 16},
                              eval={"interval": 1000}, sample={"max_new_tokens": 0})
    train(recipe_from_dict(recipe))
    return tmp / "base" / "final"


def dpo_recipe(tmp_path: Path, export: Path, data: Path, name: str = "dpo", **train_keys) -> dict:
    return {
        "run": {"output_dir": str(tmp_path / name), "seed": 0},
        "data": {"kind": "preference", "train_files": [str(data)], "val_fraction": 0.2,
                 "block_size": 128, "shuffle_tokens": 2048},
        "model": {"arch": "gpt2", "init_from": str(export)},
        "train": {"objective": "dpo", "batch_size": 8, "max_steps": 30, "lr": 3e-3,
                  "warmup_steps": 3, "min_lr": 3e-4, "log_interval": 5, **train_keys},
        "eval": {"interval": 1000, "batch_size": 16},
        "sample": {"max_new_tokens": 0},
    }


def test_dpo_from_an_export_raises_the_held_out_reward_margin(tmp_path, base_export,
                                                                      pairs, capsys):
    data = preference_file(tmp_path, pairs, 200, reversed_words=True)
    result = train(recipe_from_dict(dpo_recipe(tmp_path, base_export, data)))
    val = result.val
    assert val["pairs"] == 40  # every fifth record held out
    assert val["loss"] < np.log(2)  # below the reference's loss: it learned the preference
    assert val["reward_accuracy"] > 0.6 and val["reward_margin"] > 0
    assert 0 < val["preference_accuracy"] <= 1 and 0 < val["reference_preference_accuracy"] <= 1
    train_lines = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]
    assert train_lines[-1]["rewards/margins"] > 0 and train_lines[-1]["loss"] < np.log(2)
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies"} <= train_lines[-1].keys()
    # the export is a plain model that prefers the chosen side as the run measured
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = AutoModelForCausalLM.from_pretrained(result.final_dir)
    streams = DataStreams(DataConfig(kind="preference", train_files=[str(data)],
                                     val_fraction=0.2, block_size=128),
                          AutoTokenizer.from_pretrained(result.final_dir), seed=0)
    right = total = 0
    with torch.no_grad():
        for batch in streams.val_batches(16):
            logps = pair_logps(exported, batch, "cpu")
            real = (batch["labels"] != IGNORE_INDEX).any(-1)
            right += int((logps[0] > logps[1])[real].sum())
            total += int(real.sum())
    assert right / total == pytest.approx(val["preference_accuracy"])
    # the model card says how it was tuned and what the held-out pairs showed
    from huggingface_hub import ModelCard

    code, _, _ = cli(["push", str(result.final_dir), "--repo-id", "me/dpo", "--dry-run",
                      "--folder", str(tmp_path / "hub")], capsys)
    card = ModelCard.load(tmp_path / "hub" / "README.md").text
    assert code == 0 and "preference-tuned with DPO (beta 0.1)" in card
    assert f"the chosen side preferred in {val['preference_accuracy']:.1%} of the pairs" in card


def test_a_resume_whose_reference_export_changed_is_refused(tmp_path, base_export, pairs,
                                                           capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    export = tmp_path / "sft"
    shutil.copytree(base_export, export)
    recipe = dpo_recipe(tmp_path, export, preference_file(tmp_path, pairs, 80), max_steps=10)
    recipe["checkpoint"] = {"interval": 5}
    path = tmp_path / "dpo.yaml"
    path.write_text(json.dumps(recipe))
    assert run_with_fault(tmp_path / "record", path, kill_at_step=7).returncode == -signal.SIGKILL
    weights = load_file(export / "model.safetensors")  # the SFT export, re-written in place
    weights = {name: t + 0.01 if t.is_floating_point() else t for name, t in weights.items()}
    save_file(weights, export / "model.safetensors", metadata={"format": "pt"})
    code, _, err = cli(["train", str(path), "--resume"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "the reference model (model.init_from) is not the one this run started from" in err


def test_kill_9_then_resume_reproduces_the_uninterrupted_dpo_run(tmp_path, base_export, pairs):
    data = preference_file(tmp_path, pairs, 200)
    recipes = {}
    for name in ("whole", "killed"):
        recipes[name] = dpo_recipe(tmp_path, base_export, data, name, max_steps=20)
        recipes[name]["checkpoint"] = {"interval": 5}
    train(recipe_from_dict(recipes["whole"]))  # in process: the same figures, 10 s sooner
    path = tmp_path / "killed.yaml"
    path.write_text(json.dumps(recipes["killed"]))
    killed = run_with_fault(tmp_path / "record", path, kill_at_step=13)
    assert killed.returncode == -signal.SIGKILL
    resumed = run_with_fault(tmp_path / "record", path, extra=["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    steps = trained_steps(tmp_path / "record")  # steps 11-12 again, from the step-10 checkpoint
    assert sorted(steps) == list(range(1, 21))
    lines = {name: [r for r in read_metrics(tmp_path / name / "metrics.jsonl")]
             for name in ("whole", "killed")}
    assert [r["step"] for r in lines["killed"]] == [r["step"] for r in lines["whole"]]
    for got, want in zip(lines["killed"], lines["whole"], strict=True):
        for key in ("loss", "rewards/margins", "rewards/accuracies", "val_loss", "val_pref_acc"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-5), (got["step"], key)


@pytest.mark.parametrize("line, expected", [
    ({"prompt": "a", "chosen": 3, "rejected": "c"}, "'chosen' is a number"),
    ({"prompt": "a", "chosen": "b"}, "'rejected' is absent"),
    ({"prompt": "a", "chosen": "b", "rejected": "b"}, "the same text: the pair prefers nothing"),
    ({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
      "rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "do not differ"),
    ({"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "user", "content": "y"}],
      "rejected": [{"role": "assistant", "content": "z"}]}, "'chosen' completion has no assistant"),
    ({"prompt": [{"role": "user"}], "chosen": [], "rejected": []}, "'content' of message 1 of "
                                                                   "'prompt'"),
])
def test_a_bad_preference_record_is_named_by_file_and_line(tmp_path, base_export, pairs,
                                                           capsys, line, expected):
    data = preference_file(tmp_path, pairs, 40)
    lines = data.read_text().splitlines()
    lines.insert(6, json.dumps(line))
    data.write_text("\n".join(lines) + "\n")
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(json.dumps(dpo_recipe(tmp_path, base_export, data)))
    code, _, err = cli(["train", str(recipe)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and f"{data} line 7: " in err and expected in err, err
    assert not (tmp_path / "dpo").exists()


@pytest.mark.parametrize("change, expected", [
    ({"train": {"objective": "lm"}}, "data.kind preference is trained with train.objective: dpo"),
    ({"data": {"kind": "sft"}}, "train.objective dpo needs data.kind: preference"),
    ({"model": {"init_from": None}}, "set model.init_from"),
    ({"train": {"dpo_beta": 0}}, "dpo_beta"),
    ({"data": {"cache": "cache"}}, "records (data.kind: preference) are streamed"),
    ({"data": {"val_fraction": 0.001}}, "the validation data is empty"),  # 0 of 40 held out
    ({"data": {"block_size": 24}}, "has a completion token within data.block_size (24)"),
])
def test_dpo_settings_that_cannot_work_are_refused_in_one_line(tmp_path, base_export, pairs,
                                                               capsys, change, expected):
    recipe = dpo_recipe(tmp_path, base_export, preference_file(tmp_path, pairs, 40))
    for section, values in change.items():
        recipe[section].update(values)
    path = tmp_path / "dpo.yaml"
    path.write_text(json.dumps(recipe))
    code, _, err = cli(["train", str(path)], capsys)
    assert code == 2 and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "dpo").exists()


@pytest.mark.slow  # two processes under torchrun: half a minute
def test_two_processes_train_dpo_and_score_every_held_out_pair_once(tmp_path, base_export,
                                                                      pairs):
    import subprocess
    import sys

    from conftest import run_or_dump
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hftrain.dpo import evaluate_preferences

    data = preference_file(tmp_path, pairs, 200)
    recipe = dpo_recipe(tmp_path, base_export, data, batch_size=4)
    path = tmp_path / "dpo.yaml"
    path.write_text(json.dumps(recipe))
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    done = run_or_dump([torchrun, "--nproc_per_node", "2", "-m", "hftrain", "train", str(path)],
                       600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    final = [r for r in read_metrics(tmp_path / "dpo" / "metrics.jsonl") if "val_pairs" in r][-1]
    assert final["val_pairs"] == 40 and final["val_loss"] < np.log(2)
    # the two processes' sums equal one process scoring the export against the reference
    tok = AutoTokenizer.from_pretrained(tmp_path / "dpo" / "final")
    streams = DataStreams(DataConfig(kind="preference", train_files=[str(data)],
                                     val_fraction=0.2, block_size=128), tok, seed=0)
    reference = AutoModelForCausalLM.from_pretrained(base_export).eval()
    accelerator = Accelerator(cpu=True)
    alone = evaluate_preferences(
        AutoModelForCausalLM.from_pretrained(tmp_path / "dpo" / "final"),
        DPOObjective(reference, 0.1, accelerator), streams.val_batches(16), accelerator)
    assert alone["pairs"] == 40
    assert final["val_loss"] == pytest.approx(alone["loss"], rel=1e-5)
    assert final["val_pref_acc"] == pytest.approx(alone["preference_accuracy"])
    assert final["val_ref_pref_acc"] == pytest.approx(alone["reference_preference_accuracy"])
    assert subprocess.run([sys.executable, "-m", "hftrain", "generate",
                           str(tmp_path / "dpo" / "final"), "--prompt", "ROMEO:",
                           "--max-new-tokens", "8"], cwd=REPO, capture_output=True).returncode == 0
