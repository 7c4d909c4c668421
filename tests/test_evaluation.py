"""Perplexity is corpus-level and token-weighted; padding is never scored."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from hftrain.data import IGNORE_INDEX
from hftrain.evaluation import evaluate_lm, perplexity_metric, token_byte_lengths
from hftrain.models import GPT2Fields, build_gpt2
from hftrain.recipe import TokenizerConfig
from hftrain.tokenizer import build_tokenizer


def test_metric_weights_tokens_not_batches():
    metric = perplexity_metric()
    result = metric.compute(nll_sum=[30.0, 1.0], token_count=[10, 1], byte_count=[10, 1])
    assert result["loss"] == pytest.approx(31.0 / 11)
    assert result["perplexity"] == pytest.approx(math.exp(31.0 / 11))
    assert result["bits_per_byte"] == pytest.approx(31.0 / 11 / math.log(2))
    naive = (math.exp(3.0) + math.exp(1.0)) / 2  # what averaging per-text perplexities gives
    assert result["perplexity"] != pytest.approx(naive)


@pytest.fixture(scope="module")
def tiny_model_and_tokenizer(shakespeare_text):
    tok = build_tokenizer(TokenizerConfig(kind="char"), [shakespeare_text], 32)
    torch.manual_seed(0)
    return build_gpt2(GPT2Fields(n_layer=1, n_head=2, n_embd=32), tok, 32).eval(), tok


def test_padding_is_never_scored(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    torch.manual_seed(1)
    full = torch.randint(4, len(tok), (3, 17))
    batch = {"input_ids": full[:, :-1].clone(), "labels": full[:, 1:].clone()}
    padded = {"input_ids": batch["input_ids"].clone(), "labels": batch["labels"].clone()}
    padded["input_ids"][2, 9:] = tok.pad_token_id  # third row: a short text, padded
    padded["labels"][2, 8:] = IGNORE_INDEX
    extra = {"input_ids": torch.full((2, 16), tok.pad_token_id),
             "labels": torch.full((2, 16), IGNORE_INDEX)}  # all-padding rows
    byte_lengths = token_byte_lengths(tok)
    acc = Accelerator(cpu=True)
    result = evaluate_lm(model, [padded, extra], acc, byte_lengths)

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    nll = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
    keep = torch.ones(3, 16, dtype=torch.bool)
    keep[2, 8:] = False
    expected = nll.view(3, 16)[keep].mean().item()
    assert result["tokens"] == int(keep.sum())
    assert result["loss"] == pytest.approx(expected, rel=1e-6)


def test_byte_lengths_follow_utf8():
    tok = build_tokenizer(TokenizerConfig(kind="char"), ["aé€\n"], 8)
    lengths = token_byte_lengths(tok)
    for text, n_bytes in (("a", 1), ("é", 2), ("€", 3), ("\n", 1)):
        assert lengths[tok.convert_tokens_to_ids(text)] == n_bytes
    assert lengths[tok.eos_token_id] == 0
    bpe = build_tokenizer(TokenizerConfig(kind="byte_bpe", vocab_size=300), ["aé€ aé€"], 8)
    ids = bpe("aé€ aé€", add_special_tokens=False).input_ids
    assert int(token_byte_lengths(bpe)[ids].sum()) == len("aé€ aé€".encode())
