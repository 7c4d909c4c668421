"""Supervised fine-tuning: only completion / assistant tokens are scored, the loss equals a
manual computation over those tokens (also with uneven counts under accumulation), and
fine-tuning starts from a pretrained export, with or without LoRA."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from conftest import assert_packed_examples_apart, logits_of, tiny_recipe_dict

from hftrain.data import IGNORE_INDEX, DataStreams
from hftrain.models import GPT2Fields, build_gpt2
from hftrain.optim import build_optimizer, build_scheduler
from hftrain.recipe import DataConfig, Recipe, TokenizerConfig, TrainConfig, recipe_from_dict
from hftrain.sft import encode_record
from hftrain.tokenizer import build_tokenizer
from hftrain.tracking import read_metrics
from hftrain.train import train
from hftrain.train_step import TrainStep

RECORDS = [
    {"prompt": "Question: who speaks first?\nAnswer: ", "completion": "First Citizen."},
    {"prompt": "Q: and then?\nA: ", "completion": "All."},
    {"prompt": "Question: what do they resolve?\nAnswer: ",
     "completion": "Rather to die than to famish."},
    {"prompt": "Q: who?\nA: ", "completion": "Caius Marcius, chief enemy to the people."},
]


@pytest.fixture(scope="module")
def tok(shakespeare_text):
    record_text = "".join(r["prompt"] + r["completion"] for r in RECORDS)
    return build_tokenizer(TokenizerConfig(kind="char"), [shakespeare_text, record_text], 64)


def scored_text(tok, example: np.ndarray) -> str:
    ids, labels = example
    return tok.decode([int(i) for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])


def test_only_completions_and_assistant_turns_are_scored(tok):
    example = encode_record(RECORDS[0], tok)
    # an example opens with the start token, as every document does (and as generation does)
    assert tok.decode(example[0].tolist()) == tok.bos_token + RECORDS[0]["prompt"] \
        + RECORDS[0]["completion"] + tok.eos_token
    assert scored_text(tok, example) == RECORDS[0]["completion"] + tok.eos_token

    chat = {"messages": [{"role": "user", "content": "Speak."},
                         {"role": "assistant", "content": "Speak, speak."},
                         {"role": "user", "content": "You are all resolved?"},
                         {"role": "assistant", "content": "Resolved. resolved."}]}
    example = encode_record(chat, tok)
    assert tok.decode(example[0].tolist()) == tok.apply_chat_template(chat["messages"],
                                                                      tokenize=False)
    assert scored_text(tok, example) == f"Speak, speak.{tok.eos_token}Resolved. resolved." \
        f"{tok.eos_token}"


def sft_streams(tmp_path: Path, tok, packing: bool, block_size: int) -> DataStreams:
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    config = DataConfig(train_files=[str(path)], val_files=[str(path)], kind="sft",
                        packing=packing, block_size=block_size, shuffle_tokens=0)
    return DataStreams(config, tok, seed=0)


def test_packed_examples_score_every_completion_token_once_in_order(tmp_path, tok):
    batches = sft_streams(tmp_path, tok, packing=True, block_size=16).val_batches(4)
    scored = [int(t) for b in batches for t in b["labels"].flatten() if t != IGNORE_INDEX]
    expected = "".join(r["completion"] + tok.eos_token for r in RECORDS)
    assert tok.decode(scored) == expected


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_examples_do_not_attend_to_each_other(tmp_path, tok, attention):
    """A fine-tuning example packed after others gets the logits it gets alone: its position
    ids restart at 0, from which transformers builds a block-diagonal causal mask (as for
    padding-free packing with `DataCollatorWithFlattening`)."""
    batch = next(iter(sft_streams(tmp_path, tok, packing=True, block_size=96).val_batches(1)))
    torch.manual_seed(0)
    model = build_gpt2(GPT2Fields(n_layer=2, n_head=2, n_embd=32), tok, 96).eval()
    model.config._attn_implementation = attention
    assert_packed_examples_apart(model, batch)


def manual_masked_loss(model, tok) -> torch.Tensor:
    """Sum of completion-token NLL over all records / completion-token count, computed one
    record at a time from the prompt and completion strings."""
    total, count = 0.0, 0
    for record in RECORDS:
        prompt = tok(record["prompt"], add_special_tokens=False)["input_ids"]
        answer = tok(record["completion"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([[tok.bos_token_id, *prompt, *answer, tok.eos_token_id]])
        logits = model(input_ids=ids[:, :-1]).logits[0]
        nll = F.cross_entropy(logits, ids[0, 1:], reduction="none")
        total = total + nll[len(prompt) :].sum()
        count += len(answer) + 1
    return total / count


def test_sft_loss_equals_manual_loss_over_completions_under_uneven_accumulation(tmp_path, tok):
    streams = sft_streams(tmp_path, tok, packing=False, block_size=96)
    micro = list(streams.val_batches(2))  # two micro-batches, unequal scored tokens
    counts = [int((b["labels"] != IGNORE_INDEX).sum()) for b in micro]
    assert len(micro) == 2 and counts[0] != counts[1]

    torch.manual_seed(0)
    model = build_gpt2(GPT2Fields(n_layer=1, n_head=2, n_embd=16), tok, 96)
    reference = copy.deepcopy(model)
    config = TrainConfig(optimizer="sgd", lr=1.0, grad_clip=0.0, grad_accum_steps=2,
                         warmup_steps=0, scheduler="constant_with_warmup", weight_decay=0.0)
    optimizer = build_optimizer(model, config)
    step = TrainStep(Accelerator(cpu=True), model, optimizer,
                     build_scheduler(optimizer, config), config)
    loss = step(micro).loss

    expected = manual_masked_loss(reference, tok)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for (name, after), before in zip(model.named_parameters(), reference.parameters(),
                                     strict=True):
        torch.testing.assert_close(before.detach() - after.detach(), before.grad,
                                   rtol=1e-4, atol=1e-6, msg=name)


def write_sft_records(path: Path, n: int = 200) -> Path:
    lines = []
    for i in range(n):
        r = RECORDS[i % len(RECORDS)]
        lines.append(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                              {"role": "assistant", "content": r["completion"]}]}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, shakespeare_text):
    root = tmp_path_factory.mktemp("pretrain")
    corpus = root / "corpus.txt"
    corpus.write_text(shakespeare_text)
    return train(recipe_from_dict(tiny_recipe_dict(corpus, root / "out")))


def finetune_recipe(tmp_path: Path, pretrained, **model) -> Recipe:
    data = write_sft_records(tmp_path / "chat.jsonl")
    raw = tiny_recipe_dict(data, tmp_path / "ft",
                           data={"kind": "sft", "val_fraction": 0.1, "block_size": 16},
                           train={"max_steps": 20, "warmup_steps": 0})
    raw["model"] = {"arch": "gpt2", "init_from": str(pretrained.final_dir), **model}
    return recipe_from_dict(raw)


def test_finetuning_starts_from_the_pretrained_export_and_learns(tmp_path, pretrained):
    recipe = finetune_recipe(tmp_path, pretrained)
    start = copy.deepcopy(pretrained.model.state_dict())
    result = train(recipe)
    assert result.run_dir.joinpath("final", "tokenizer.json").read_text() == \
        pretrained.final_dir.joinpath("tokenizer.json").read_text()
    evals = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    # lr 0 from the first step would leave the pretrained weights: they were the start
    frozen = train(recipe_from_dict({**recipe.to_dict(),
                                     "run": {**recipe.to_dict()["run"],
                                             "output_dir": str(tmp_path / "lr0")},
                                     "train": {**recipe.to_dict()["train"], "lr": 1e-12,
                                               "min_lr": 0.0, "max_steps": 1}}))
    for name, value in frozen.model.state_dict().items():
        torch.testing.assert_close(value, start[name], atol=1e-8, rtol=0, msg=name)


def test_lora_trains_adapters_only_and_exports_merged_weights(tmp_path, pretrained):
    recipe = finetune_recipe(tmp_path, pretrained, lora_r=4, lora_alpha=8)
    result = train(recipe)
    from transformers import AutoModelForCausalLM

    export = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert not any("lora" in name for name in export.state_dict())
    ids = torch.randint(4, 60, (2, 16))
    torch.testing.assert_close(export(input_ids=ids).logits,
                               logits_of(result.model, ids), atol=1e-5, rtol=1e-5)
    start = {name: value.cpu() for name, value in pretrained.model.state_dict().items()}
    changed = [name for name, value in export.state_dict().items()
               if not torch.equal(value, start[name])]
    assert changed and all("c_attn" in name for name in changed)
