"""Perplexity is corpus-level and token-weighted; padding is never scored."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from hftrain.data import IGNORE_INDEX
from hftrain.evaluation import evaluate_lm, evaluate_texts, perplexity_metric
from hftrain.framing import Framing, token_bytes
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
    padded = {"input_ids": batch["input_ids"].clone(), "labels": batch["labels"].clone(),
              "byte_counts": torch.ones(3, 16, dtype=torch.long)}
    padded["input_ids"][2, 9:] = tok.pad_token_id  # third row: a short text, padded
    padded["labels"][2, 8:] = IGNORE_INDEX
    extra = {"input_ids": torch.full((2, 16), tok.pad_token_id),
             "labels": torch.full((2, 16), IGNORE_INDEX),
             "byte_counts": torch.ones(2, 16, dtype=torch.long)}  # all-padding rows
    acc = Accelerator(cpu=True)
    result = evaluate_lm(model, [padded, extra], acc)

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    nll = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
    keep = torch.ones(3, 16, dtype=torch.bool)
    keep[2, 8:] = False
    expected = nll.view(3, 16)[keep].mean().item()
    assert result["tokens"] == result["bytes"] == int(keep.sum())
    assert result["loss"] == pytest.approx(expected, rel=1e-6)


# Spaces (runs of them), line breaks, a blank line, CRLF, accents, an emoji, a word and
# characters no tokenizer below has seen, and a special token written in the text.
TEXT = ("The cat  sat\non the mat, naïvely 🙂.\n\nIt's über-cool\r\n€5 zyzzyva\n"
        "<|endoftext|> ends nothing\n")
KINDS = ("char", "byte_bpe", "word")


def tokenizer_of(kind: str, corpus: str):
    return build_tokenizer(TokenizerConfig(kind=kind, vocab_size=300, min_frequency=1),
                           [corpus], 32)


@pytest.mark.parametrize("kind", KINDS)
def test_tokens_stand_for_every_byte_of_the_text(kind, shakespeare_text):
    """Bits per byte divides by the bytes of the text scored: whitespace, line breaks and
    unknown words count for every tokenizer kind (a special token written in the text is not
    text). The word tokenizer once counted only the spelling of known words."""
    tok = tokenizer_of(kind, shakespeare_text[:20_000])
    framing = Framing.of(tok)
    encoding = tok.backend_tokenizer.encode(TEXT, add_special_tokens=False)
    counts = token_bytes(framing, TEXT, encoding)
    assert len(counts) == len(framing.document(encoding.ids))
    assert int(counts.sum()) == len(TEXT.encode()) - len("<|endoftext|>")
    assert (counts >= 0).all()
    # cut in two parts (a document read in two pieces), the bytes still add up
    head, tail = TEXT[:40], TEXT[40:]
    parts = [token_bytes(framing, text, tok.backend_tokenizer.encode(text), begins, ends)
             for text, begins, ends in ((head, True, False), (tail, False, True))]
    assert sum(int(p.sum()) for p in parts) == int(counts.sum())


def test_every_tokenizer_scores_the_same_bytes_and_lm_evals_formula(shakespeare_text):
    """One text, three tokenizers: one byte denominator, and bits per byte is lm-eval's
    `bits_per_byte` (-sum of log-likelihoods / bytes / ln 2) of the scored NLL."""
    text = TEXT.replace("<|endoftext|>", "")
    results = {}
    for kind in KINDS:
        tok = tokenizer_of(kind, shakespeare_text[:20_000])
        torch.manual_seed(0)
        model = build_gpt2(GPT2Fields(n_layer=1, n_head=2, n_embd=32), tok, 32).eval()
        results[kind] = evaluate_texts(model, tok, [text, text[:7]], Accelerator(cpu=True), 32)
    assert {r["bytes"] for r in results.values()} == {len(text.encode()) + len(text[:7].encode())}
    for r in results.values():
        assert r["bits_per_byte"] == pytest.approx(r["nll"] / r["bytes"] / math.log(2))
        assert r["loss"] == pytest.approx(r["nll"] / r["tokens"])
    assert len({r["tokens"] for r in results.values()}) == 3  # three different tokenizations
