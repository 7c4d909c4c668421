"""Tokenizers built from the corpus round-trip text and reload with plain AutoTokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from hftrain.errors import DataError
from hftrain.recipe import TokenizerConfig
from hftrain.tokenizer import SPECIAL_TOKENS, build_tokenizer, save_tokenizer


def test_char_tokenizer_is_one_token_per_character(shakespeare_text: str, tmp_path: Path):
    tok = build_tokenizer(TokenizerConfig(kind="char"), [shakespeare_text], 64)
    assert len(tok) == len(set(shakespeare_text)) + len(SPECIAL_TOKENS)
    ids = tok("ROMEO:\nO", add_special_tokens=False).input_ids
    assert len(ids) == len("ROMEO:\nO")
    assert tok.decode(ids) == "ROMEO:\nO"
    assert tok.convert_ids_to_tokens(tok("€", add_special_tokens=False).input_ids) == ["<|unk|>"]

    save_tokenizer(tok, tmp_path / "tok")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert reloaded(shakespeare_text[:500]).input_ids == tok(shakespeare_text[:500]).input_ids
    # BOS and EOS are one token, as GPT-2's: a client that prefixes BOS (lm-eval) gives the
    # first token of a text the context it had in training
    assert (reloaded.eos_token, reloaded.bos_token, reloaded.pad_token) == (
        "<|endoftext|>", "<|endoftext|>", "<|pad|>")
    assert not list(tmp_path.glob(".*tmp")), "temporary folder left behind"


def test_byte_bpe_tokenizer_has_requested_size_and_is_lossless(shakespeare_text: str):
    tok = build_tokenizer(TokenizerConfig(kind="byte_bpe", vocab_size=400), [shakespeare_text], 64)
    assert len(tok) == 400
    text = "KING RICHARD: ünïcödé and emoji 🙂 never become <unk>"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert len(tok(shakespeare_text, add_special_tokens=False).input_ids) < len(shakespeare_text)


def test_empty_corpus_is_an_error():
    with pytest.raises(DataError, match="empty"):
        build_tokenizer(TokenizerConfig(kind="char"), ["", ""], 64)


def test_word_tokenizer_keeps_line_breaks_as_a_word(tmp_path: Path):
    """Line breaks inside a document are an end-of-line token (the classic PTB/WikiText
    setup), which survives a reload and decodes back to a line break."""
    corpus = "the cat sat\non the mat\n\nthe end\n"
    tok = build_tokenizer(TokenizerConfig(kind="word", vocab_size=100, min_frequency=1),
                          [corpus], 64)
    save_tokenizer(tok, tmp_path / "tok")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    ids = reloaded("the cat\r\n  sat dog\non", add_special_tokens=False).input_ids
    assert reloaded.convert_ids_to_tokens(ids) == ["the", "cat", "\n", "sat", "<|unk|>",
                                                   "\n", "on"]
    assert reloaded.decode(ids) == "the cat\nsat <|unk|>\non"
    # trained on single lines, the end-of-line token still exists for multi-line text
    lines = build_tokenizer(TokenizerConfig(kind="word", vocab_size=100, min_frequency=1),
                            ["the cat sat", "on the mat"], 64)
    assert lines.convert_ids_to_tokens(lines("the\ncat", add_special_tokens=False).input_ids) \
        == ["the", "\n", "cat"]
