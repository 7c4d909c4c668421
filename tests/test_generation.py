"""Generation reads a prompt as the start of a document, continues it past a fixed-context
model's window and stops at EOS."""

from __future__ import annotations

import torch

from hftrain.generation import generate_text
from hftrain.models import GPT2Fields, build_gpt2
from hftrain.recipe import TokenizerConfig
from hftrain.tokenizer import build_tokenizer


def tiny(shakespeare_text, block_size=16):
    tok = build_tokenizer(TokenizerConfig(kind="char"), [shakespeare_text], block_size)
    torch.manual_seed(0)
    return build_gpt2(GPT2Fields(n_layer=1, n_head=2, n_embd=16), tok, block_size).eval(), tok


def test_generates_more_tokens_than_the_context_window(shakespeare_text):
    model, tok = tiny(shakespeare_text)
    with torch.no_grad():  # never end a document, never emit a special token (decode drops
        model.transformer.ln_f.bias[0] = 10.0  # them): a constant hidden unit times a large
        for special in tok.all_special_ids:  # negative weight in the special tokens' rows
            model.lm_head.weight[special] = 0.0
            model.lm_head.weight[special, 0] = -10.0
    text = generate_text(model, tok, "ROMEO:", max_new_tokens=50, temperature=1.0, top_k=None)
    assert text.startswith("ROMEO:")
    assert len(tok(text, add_special_tokens=False).input_ids) == len("ROMEO:") + 50


def test_greedy_generation_is_deterministic_and_empty_prompt_works(shakespeare_text):
    model, tok = tiny(shakespeare_text)
    a = generate_text(model, tok, "", max_new_tokens=20, temperature=0)
    b = generate_text(model, tok, "", max_new_tokens=20, temperature=0)
    assert a == b


def test_generation_stops_at_eos(shakespeare_text):
    model, tok = tiny(shakespeare_text)
    with torch.no_grad():  # make EOS the only likely next token
        model.lm_head.bias = None
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.eos_token_id, 0] = 10.0
    assert generate_text(model, tok, "ROMEO:", max_new_tokens=30, temperature=0) == "ROMEO:"


def test_a_prompt_is_read_as_the_start_of_a_document(shakespeare_text):
    """The model sees the start token before the prompt, as it saw every document in
    training (and as lm-eval's BOS prefix gives it)."""
    model, tok = tiny(shakespeare_text)
    text = generate_text(model, tok, "ROMEO:", max_new_tokens=8, temperature=0)
    ids = torch.tensor([[tok.bos_token_id, *tok("ROMEO:", add_special_tokens=False).input_ids]])
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                              do_sample=False, pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id)
    assert text == tok.decode(expected[0, 1:], skip_special_tokens=True)
