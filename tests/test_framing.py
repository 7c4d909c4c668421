"""Document framing and the bytes tokens stand for, probed as a hostile user would: odd
texts, pieces cut anywhere, other tokenizers' BOS/UNK conventions, two processes, the token
cache, the word tokenizer's line breaks, packed fine-tuning positions, generation after the
start token. Each test states what a user would expect of a reported figure."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import cli, tiny_recipe_dict
from transformers import PreTrainedTokenizerFast

import hftrain.data.sources as sources
from hftrain.data import IGNORE_INDEX, DataStreams
from hftrain.data import cache as token_cache
from hftrain.data.loader import PieceTokenizer, TrainStream
from hftrain.data.sources import SplitPieces
from hftrain.errors import RecipeError
from hftrain.evaluation import evaluate_texts
from hftrain.framing import Framing, token_bytes
from hftrain.models import GPT2Fields, build_gpt2
from hftrain.recipe import DataConfig, TokenizerConfig, recipe_from_dict
from hftrain.sft import encode_record
from hftrain.tokenizer import ENDOFTEXT, PAD, TURN, UNK, build_tokenizer
from hftrain.train import train

KINDS = ("char", "byte_bpe", "word")
NASTY = "é🙂世界ü€\u00a0"
"""Multibyte characters (2, 4, 3, 3, 2, 3 bytes) and a no-break space."""


@pytest.fixture(scope="module")
def toks(shakespeare_text):
    corpus = shakespeare_text[:20_000] + NASTY + "\n\n\n\n" * 20
    return {kind: build_tokenizer(TokenizerConfig(kind=kind, vocab_size=400, min_frequency=1),
                                  [corpus], 32)
            for kind in KINDS}


def scored_bytes_and_tokens(batches) -> tuple[int, int]:
    n_bytes = n_tokens = 0
    for batch in batches:
        mask = batch["labels"] != IGNORE_INDEX
        n_bytes += int(batch["byte_counts"][mask].sum())
        n_tokens += int(mask.sum())
    return n_bytes, n_tokens


def val_config(path: Path, **kw) -> DataConfig:
    values = {"train_files": [str(path)], "val_files": [str(path)], "block_size": 8,
              "num_workers": 0, "shuffle_tokens": 0}
    values.update(kw)
    return DataConfig(**values)


def val_stream_ids(batches) -> list[int]:
    """The validation token stream, back from its blocks (first input + every target)."""
    stream: list[int] = []
    for batch in batches:
        for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                               strict=True):
            if labels[0] == IGNORE_INDEX and ids[0] == 0:
                continue  # an all-padding row
            if not stream:
                stream.append(ids[0])
            stream += [t for t in labels if t != IGNORE_INDEX]
    return stream


# --------------------------------------------------------------------------------------------
# Bytes: the same text, the same denominator, whatever the tokenizer and the pieces


@pytest.mark.parametrize("text", [
    "x <|endoftext|> y",
    "a  <|endoftext|>\tb",
    "word <|turn|> other",
])
def test_a_special_token_written_in_text_costs_the_same_bytes_for_every_tokenizer(toks, text):
    """README: "the same text has the same denominator" for char, BPE and word tokenizers,
    and "special tokens written in the text stand for nothing" -- only the special token's own
    spelling, not the whitespace before it, should go uncounted."""
    expected = len(text.encode()) - sum(len(s) for s in (ENDOFTEXT, TURN) if s in text)
    got = {}
    for kind, tok in toks.items():
        encoding = tok.backend_tokenizer.encode(text, add_special_tokens=False)
        got[kind] = int(token_bytes(Framing.of(tok), text, encoding).sum())
    assert got == {kind: expected for kind in KINDS}


def test_a_special_token_in_text_counts_zero_bytes_also_when_unk_is_eos(toks):
    """GPT-2's own tokenizer has unk = bos = eos = <|endoftext|>. A corpus written with
    <|endoftext|> separators must get the same denominator as with hftrain's tokenizers
    (README: special tokens written in the text stand for nothing)."""
    base = toks["byte_bpe"]
    gpt2_like = PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(base.backend_tokenizer),
                                        bos_token=ENDOFTEXT, eos_token=ENDOFTEXT,
                                        unk_token=ENDOFTEXT, pad_token=PAD)
    text = "one doc<|endoftext|>another doc"
    counts = {}
    for name, tok in (("hftrain", base), ("gpt2-like", gpt2_like)):
        encoding = tok.backend_tokenizer.encode(text, add_special_tokens=False)
        counts[name] = int(token_bytes(Framing.of(tok), text, encoding).sum())
    assert counts["gpt2-like"] == counts["hftrain"] == len(text) - len(ENDOFTEXT)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("piece_bytes", [1 << 20, 23, 3])
@pytest.mark.parametrize("stateful", [False, True])
def test_validation_bytes_are_the_text_bytes_whatever_the_pieces(tmp_path, monkeypatch, toks,
                                                                  kind, piece_bytes, stateful):
    """One document read in many pieces, multibyte characters next to the cuts, CRLF, blank
    lines, runs of spaces, a tail without a line break: the scored bytes are the text's."""
    monkeypatch.setattr(sources, "PIECE_BYTES", piece_bytes)
    text = (f"First {NASTY} line\r\n\r\n  {NASTY} spaces   \n\n\n{NASTY}\nzyzzyva\n" * 12
            + f"tail {NASTY}  ")
    path = tmp_path / "val.txt"
    path.write_bytes(text.encode())
    streams = DataStreams(val_config(path), toks[kind], seed=0, stateful=stateful)
    assert len(streams.pieces("val").pieces) > 1 or piece_bytes == 1 << 20
    n_bytes, _ = scored_bytes_and_tokens(streams.val_batches(4))
    assert n_bytes == len(text.replace("\r\n", "\n").encode())


@pytest.mark.parametrize("kind", KINDS)
def test_only_whitespace_and_lone_cr_text_bytes_count(tmp_path, toks, kind):
    text = "   \r  \t \r\r \n \u00a0 "
    path = tmp_path / "val.txt"
    path.write_bytes(text.encode())
    n_bytes, n_tokens = scored_bytes_and_tokens(DataStreams(val_config(path), toks[kind],
                                                            seed=0).val_batches(4))
    assert n_tokens >= 1
    assert n_bytes == len(text.replace("\r", "\n").encode())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sample_by", ["document", "line"])
def test_two_process_validation_loses_at_most_each_ranks_first_token(tmp_path, toks, kind,
                                                                     sample_by):
    """Validation over 2 ranks: the bytes summed over ranks are the text's, minus at most the
    first token of each later rank's first piece (loader.val_batches docstring)."""
    text = "".join(f"line {i} {NASTY}  with  spaces\n" for i in range(40)) + "\n\nend"
    path = tmp_path / "val.txt"
    path.write_text(text)
    config = val_config(path, sample_by=sample_by)
    total = 0
    allowance = 0
    for rank in range(2):
        streams = DataStreams(config, toks[kind], seed=0, rank=rank, world_size=2)
        total += scored_bytes_and_tokens(streams.val_batches(4))[0]
        pieces = streams.pieces("val")
        mine = list(range(rank, len(pieces.pieces), 2))
        if rank and mine:
            first = PieceTokenizer(pieces, toks[kind], with_bytes=True)[mine[0]]
            allowance += int(first.tokens[1][0])
    whole = DataStreams(config, toks[kind], seed=0)
    one_process = scored_bytes_and_tokens(whole.val_batches(4))[0]
    assert one_process - allowance <= total <= one_process


@pytest.mark.parametrize("kind", KINDS)
def test_token_cache_validation_bytes_equal_the_streamed_ones(tmp_path, monkeypatch, toks,
                                                              kind):
    monkeypatch.setattr(sources, "PIECE_BYTES", 40)
    text = "".join(f"{NASTY} {i}  x\r\n" for i in range(30))
    path = tmp_path / "val.txt"
    path.write_bytes(text.encode())
    streamed = scored_bytes_and_tokens(DataStreams(val_config(path), toks[kind],
                                                   seed=0).val_batches(4))
    config = val_config(path, cache=str(tmp_path / "cache"))
    token_cache.prepare(config, toks[kind], show_progress=False)
    cached = scored_bytes_and_tokens(DataStreams(config, toks[kind], seed=0).val_batches(4))
    assert cached == streamed
    assert cached[0] == len(text.replace("\r\n", "\n").encode())


def test_token_cache_is_rebuilt_when_the_framing_changes(tmp_path, toks):
    """The cache records "the tokenizer"; a tokenizer whose BOS changed (same vocabulary)
    frames documents differently, so it must not read the tokens framed with the old BOS."""
    tok = toks["char"]
    other = PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(tok.backend_tokenizer),
                                    bos_token=TURN, eos_token=ENDOFTEXT, unk_token=UNK,
                                    pad_token=PAD)
    assert Framing.of(other) != Framing.of(tok)
    path = tmp_path / "t.txt"
    path.write_text("abc\nde\n")
    config = val_config(path, sample_by="line", block_size=4, cache=str(tmp_path / "cache"))
    token_cache.prepare(config, tok, show_progress=False)
    streamed = val_stream_ids(DataStreams(val_config(path, sample_by="line", block_size=4),
                                          other, seed=0).val_batches(4))
    try:
        cached = val_stream_ids(DataStreams(config, other, seed=0).val_batches(4))
    except Exception:  # refusing the stale cache (run hftrain prepare) is fine too
        return
    assert cached == streamed


# --------------------------------------------------------------------------------------------
# Framing with other tokenizers


def distinct_bos(tok) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(tok.backend_tokenizer),
                                   bos_token=TURN, eos_token=ENDOFTEXT, unk_token=UNK,
                                   pad_token=PAD)


def no_bos(tok) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(tok.backend_tokenizer),
                                   eos_token=ENDOFTEXT, unk_token=UNK, pad_token=PAD)


@pytest.mark.parametrize("piece_bytes", [1 << 20, 5])
def test_distinct_bos_frames_every_document_b_doc_e(tmp_path, monkeypatch, toks, piece_bytes):
    monkeypatch.setattr(sources, "PIECE_BYTES", piece_bytes)
    tok = distinct_bos(toks["char"])
    lines = ["abc", "", "de", "f g"]
    path = tmp_path / "t.txt"
    path.write_text("\n".join(lines) + "\n")
    B, E = tok.bos_token_id, tok.eos_token_id  # noqa: N806
    expected = []
    for line in lines:
        expected += [B, *tok(line, add_special_tokens=False).input_ids, E]
    config = val_config(path, sample_by="line", block_size=4)
    assert val_stream_ids(DataStreams(config, tok, seed=0).val_batches(3)) == expected
    n_bytes, n_tokens = scored_bytes_and_tokens(DataStreams(config, tok, seed=0).val_batches(3))
    assert (n_bytes, n_tokens) == (sum(len(x) for x in lines), len(expected) - 1)
    train = TrainStream(SplitPieces(config, "train"), tok, config, seed=0, batch_size=2)
    batch = next(train)
    first_block = [*batch["input_ids"][0].tolist(), batch["labels"][0, -1].item()]
    assert first_block == expected[:5]
    train.close()


def test_distinct_bos_document_in_pieces_is_framed_once(tmp_path, monkeypatch, toks):
    monkeypatch.setattr(sources, "PIECE_BYTES", 4)
    tok = distinct_bos(toks["char"])
    text = "ab\ncd\nef\n"
    path = tmp_path / "t.txt"
    path.write_text(text)
    config = val_config(path, block_size=4)
    assert len(SplitPieces(config, "val").pieces) > 1
    expected = [tok.bos_token_id, *tok(text, add_special_tokens=False).input_ids,
                tok.eos_token_id]
    assert val_stream_ids(DataStreams(config, tok, seed=0).val_batches(2)) == expected


def test_no_bos_tokenizer_frames_with_eos(tmp_path, toks):
    tok = no_bos(toks["char"])
    assert tok.bos_token_id is None
    path = tmp_path / "t.txt"
    path.write_text("ab\n\ncd\n")
    config = val_config(path, sample_by="line", block_size=4)
    E = tok.eos_token_id  # noqa: N806
    ab, cd = (tok(x, add_special_tokens=False).input_ids for x in ("ab", "cd"))
    assert val_stream_ids(DataStreams(config, tok, seed=0).val_batches(2)) == \
        [E, *ab, E, E, *cd, E]


@pytest.mark.parametrize("make", [distinct_bos, no_bos])
def test_eval_texts_frames_like_validation_for_other_tokenizers(tmp_path, toks, make):
    tok = make(toks["char"])
    text = "To be, or not\nto be: " + NASTY
    path = tmp_path / "t.txt"
    path.write_text(text)
    torch.manual_seed(0)
    model = build_gpt2(GPT2Fields(n_layer=1, n_head=2, n_embd=16), tok, 8).eval()
    acc = Accelerator(cpu=True)
    from hftrain.evaluation import evaluate_lm

    streamed = evaluate_lm(model, DataStreams(val_config(path), tok, seed=0).val_batches(4), acc)
    direct = evaluate_texts(model, tok, [text], acc, block_size=8)
    assert direct["tokens"] == streamed["tokens"]
    assert direct["bytes"] == streamed["bytes"] == len(text.encode())
    assert direct["loss"] == pytest.approx(streamed["loss"], rel=1e-6)


# --------------------------------------------------------------------------------------------
# hftrain eval equals in-training validation for one document, whatever its size


def test_a_large_one_document_val_file_tokenizes_as_hftrain_eval_does(tmp_path, monkeypatch,
                                                                       toks):
    """README: "for a one-document validation file the figure equals the one training
    reported". A val file over PIECE_BYTES (1 MiB; WikiText-103's is 1.1 MB) is read in
    pieces, each tokenized on its own; `hftrain eval` tokenizes the whole text. A BPE merge
    across a cut ("\\n\\n" split after its first "\\n") makes the two token streams differ,
    and with them the token count, loss and perplexity."""
    monkeypatch.setattr(sources, "PIECE_BYTES", 16)  # stands for a > 1 MiB file
    tok = toks["byte_bpe"]
    assert len(tok("\n\n", add_special_tokens=False).input_ids) == 1  # "\n\n" is one token
    text = "word one\n\n\nword two\n \nthree\n" * 20
    path = tmp_path / "val.txt"
    path.write_text(text)
    in_training = val_stream_ids(DataStreams(val_config(path), tok, seed=0).val_batches(4))
    framing = Framing.of(tok)
    by_eval = framing.opening + framing.document(tok(text, add_special_tokens=False).input_ids)
    assert len(in_training) == len(by_eval)
    assert in_training == by_eval


@pytest.fixture(scope="module")
def run(tmp_path_factory, shakespeare_text):
    """A tiny char GPT-2 validated on a one-document file."""
    root = tmp_path_factory.mktemp("probe_run")
    (root / "train.txt").write_text(shakespeare_text[:12_000])
    (root / "val.txt").write_text(shakespeare_text[12_000:13_500] + NASTY + "\n")
    raw = tiny_recipe_dict(root / "train.txt", root / "run",
                           data={"val_files": [str(root / "val.txt")]},
                           train={"max_steps": 10}, eval={"interval": 10})
    return {"result": train(recipe_from_dict(raw)), "val": root / "val.txt", "root": root}


def test_eval_command_matches_in_training_figures_including_bits_per_byte(run, capsys):
    code, out, err = cli(["eval", str(run["result"].final_dir), "--data", str(run["val"]),
                          "--json"], capsys)
    assert code == 0, err
    got = json.loads(out)
    val = run["result"].val
    assert got["tokens"] == val["tokens"]
    assert got["bytes"] == val["bytes"] == len(run["val"].read_bytes())
    assert got["loss"] == pytest.approx(val["loss"], rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(val["bits_per_byte"], rel=1e-5)


def test_eval_on_an_empty_file_is_one_line_error(run, capsys):
    empty = run["root"] / "empty.txt"
    empty.write_text("")
    code, out, err = cli(["eval", str(run["result"].final_dir), "--data", str(empty)], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "empty.txt" in err


def test_eval_on_a_binary_file_is_one_line_error(run, capsys):
    binary = run["root"] / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    code, out, err = cli(["eval", str(run["result"].final_dir), "--data", str(binary)], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "binary.txt" in err


def test_eval_on_a_text_of_only_special_tokens_gives_no_nan(run, capsys):
    """A text with nothing but a special token has 0 bytes of text: bits per byte cannot be
    a number; a user expects an error naming the file (as for an empty file), not 'nan'."""
    special = run["root"] / "special.txt"
    special.write_text(ENDOFTEXT)
    code, out, err = cli(["eval", str(run["result"].final_dir), "--data", str(special)], capsys)
    assert "nan" not in out.lower()


def test_eval_line_mode_with_empty_lines_and_whitespace(run, capsys):
    text = "\n  \nFirst Citizen:\n\n\nAll:\n"
    path = run["root"] / "lines.txt"
    path.write_text(text)
    code, out, err = cli(["eval", str(run["result"].final_dir), "--data", str(path),
                          "--sample-by", "line", "--json"], capsys)
    assert code == 0, err
    got = json.loads(out)
    lines = text[:-1].split("\n")
    assert got["tokens"] == sum(len(x) + 1 for x in lines)
    assert got["bytes"] == sum(len(x) for x in lines)


def test_generate_with_an_empty_prompt_works(run, capsys):
    code, out, err = cli(["generate", str(run["result"].final_dir), "--max-new-tokens", "5",
                          "--temperature", "0"], capsys)
    assert code == 0, err


# --------------------------------------------------------------------------------------------
# The word tokenizer's line breaks


@pytest.fixture(scope="module")
def word_tok():
    corpus = "a b c\nthe cat sat\n\non the mat\n" * 5
    return build_tokenizer(TokenizerConfig(kind="word", vocab_size=100, min_frequency=1),
                           [corpus], 32)


@pytest.mark.parametrize("text", ["a\n\nb", "\na\n", "a\n", "\n\n", "\n", "the cat\n\n\nsat\n",
                                  "a b\nc", "\n\na b c\n\n"])
def test_word_tokenizer_round_trips_line_structure(word_tok, text):
    ids = word_tok(text, add_special_tokens=False).input_ids
    assert word_tok.decode(ids) == text


def test_word_tokenizer_reloaded_keeps_line_breaks(tmp_path, word_tok):
    from hftrain.tokenizer import load_tokenizer, save_tokenizer

    save_tokenizer(word_tok, tmp_path / "tok")
    again = load_tokenizer(str(tmp_path / "tok"))
    text = "the cat\r\nsat\ron the mat\n"
    ids = again(text, add_special_tokens=False).input_ids
    assert ids == word_tok(text, add_special_tokens=False).input_ids
    assert again.decode(ids) == "the cat\nsat\non the mat\n"


def test_word_tokenizer_has_a_line_break_token_even_without_lines(tmp_path):
    tok = build_tokenizer(TokenizerConfig(kind="word", vocab_size=100, min_frequency=1),
                          ["one line only"], 32)
    ids = tok("one\nline", add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids and len(ids) == 3
    assert tok.decode(ids) == "one\nline"


def test_word_tokenizer_with_a_tiny_vocabulary_keeps_the_line_break(tmp_path):
    """vocab_size smaller than the words: "\\n" must stay a word, not become <|unk|>."""
    corpus = "x y z w\n" + "alpha beta gamma delta epsilon " * 50
    tok = build_tokenizer(TokenizerConfig(kind="word", vocab_size=6, min_frequency=1),
                          [corpus], 32)
    ids = tok("alpha\nbeta", add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(ids[1]) == "\n"


# --------------------------------------------------------------------------------------------
# Fine-tuning: packed positions, bytes of scored text, old checkpoints, recurrent refusal

RECORDS = [
    {"prompt": "Q: who?\nA: ", "completion": "First Citizen " + NASTY},
    {"prompt": "Q: and?\nA: ", "completion": "All."},
    {"prompt": "Q: long?\nA: ", "completion": "Rather to die than to famish, " * 6},
    {"messages": [{"role": "user", "content": "Speak " + NASTY},
                  {"role": "assistant", "content": "Speak, speak. " + NASTY}]},
]


@pytest.fixture(scope="module")
def sft_tok(shakespeare_text):
    text = "".join(r.get("prompt", "") + r.get("completion", "") for r in RECORDS)
    return build_tokenizer(TokenizerConfig(kind="char"), [shakespeare_text, text, NASTY,
                                                          "Speak, speak.\nuser assistant"], 64)


def sft_config(tmp_path: Path, **kw) -> DataConfig:
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    values = {"train_files": [str(path)], "val_files": [str(path)], "kind": "sft",
              "block_size": 16, "shuffle_tokens": 0, "num_workers": 0}
    values.update(kw)
    return DataConfig(**values)


def completion_bytes() -> int:
    total = 0
    for r in RECORDS:
        if "completion" in r:
            total += len(r["completion"].encode())
        else:
            total += sum(len(m["content"].encode()) for m in r["messages"]
                         if m["role"] == "assistant")
    return total


@pytest.mark.parametrize("packing", [True, False])
def test_sft_positions_stay_within_the_block_and_bytes_are_the_answers(tmp_path, sft_tok,
                                                                       packing):
    config = sft_config(tmp_path, packing=packing, block_size=64)
    streams = DataStreams(config, sft_tok, seed=0)
    batches = list(streams.val_batches(2))
    for batch in batches:
        assert int(batch["position_ids"].min()) == 0
        assert int(batch["position_ids"].max()) <= 63
    if packing:  # every completion token scored once, with the bytes of the answers
        assert scored_bytes_and_tokens(batches)[0] == completion_bytes()
    train_stream = streams.train_batches(4)
    for _ in range(3):
        batch = next(train_stream)
        assert int(batch["position_ids"].max()) <= 63
        assert batch["position_ids"].shape == batch["input_ids"].shape
    train_stream.close()


def test_unpacked_sft_example_gets_the_logits_it_gets_alone(tmp_path, sft_tok):
    config = sft_config(tmp_path, packing=False, block_size=64)
    batch = next(iter(DataStreams(config, sft_tok, seed=0).val_batches(4)))
    torch.manual_seed(0)
    model = build_gpt2(GPT2Fields(n_layer=1, n_head=2, n_embd=16), sft_tok, 64).eval()
    with torch.no_grad():
        batched = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                        use_cache=False).logits
        for row, record in enumerate(RECORDS):
            example = encode_record(record, sft_tok)[0][:64]
            alone = model(input_ids=torch.tensor([example.tolist()])).logits[0]
            torch.testing.assert_close(batched[row, : len(example)], alone[: 64],
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_recurrent_sft_refuses_packing_and_accepts_unpacked(tmp_path, arch):
    raw = tiny_recipe_dict(tmp_path / "x.jsonl", tmp_path / "out",
                           data={"kind": "sft", "val_fraction": 0.0})
    raw["model"] = {"arch": arch, "embedding_size": 8, "hidden_size": 8, "num_layers": 1}
    with pytest.raises(RecipeError, match="packing"):
        recipe_from_dict(raw)
    raw["data"]["packing"] = False
    recipe_from_dict(raw)


def test_sft_validation_in_two_processes_scores_every_answer_byte(tmp_path, sft_tok):
    config = sft_config(tmp_path, packing=True, block_size=16)
    total = 0
    for rank in range(2):
        streams = DataStreams(config, sft_tok, seed=0, rank=rank, world_size=2)
        total += scored_bytes_and_tokens(streams.val_batches(2))[0]
    assert total == completion_bytes()


# --------------------------------------------------------------------------------------------
# Generation after the start token


def test_word_generation_keeps_an_unknown_prompt_word(word_tok):
    """The prompt comes back at the start of the text (README); an unknown word in it is
    scored as <|unk|>, and dropping it from the printed prompt loses what the user typed."""
    from hftrain.generation import generate_text

    torch.manual_seed(0)
    model = build_gpt2(GPT2Fields(n_layer=1, n_head=2, n_embd=16), word_tok, 32).eval()
    text = generate_text(model, word_tok, "the zebra", max_new_tokens=3, temperature=0)
    assert "zebra" in text or word_tok.unk_token in text


def test_bytes_add_up_with_trimmed_offsets_and_prefix_space(toks):
    """Loaded tokenizers (RoBERTa-style) trim whitespace off offsets and may add a prefix
    space: the bytes of the text must still add up."""
    from tokenizers import processors

    backend = copy.deepcopy(toks["byte_bpe"].backend_tokenizer)
    backend.post_processor = processors.ByteLevel(trim_offsets=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=ENDOFTEXT,
                                  eos_token=ENDOFTEXT, unk_token=UNK, pad_token=PAD)
    text = f"  lead \n\n  {NASTY}  mid   \n tail  "
    encoding = tok.backend_tokenizer.encode(text, add_special_tokens=False)
    assert int(token_bytes(Framing.of(tok), text, encoding).sum()) == len(text.encode())


@pytest.mark.parametrize("make", [lambda t: t, distinct_bos])
def test_token_cache_streams_equal_streamed_validation(tmp_path, toks, make):
    tok = make(toks["char"])
    text = "".join(f"{NASTY} {i}\n" for i in range(9))
    path = tmp_path / "val.txt"
    path.write_text(text)
    plain = val_config(path, sample_by="line", block_size=4)
    config = val_config(path, sample_by="line", block_size=4, cache=str(tmp_path / "c"))
    token_cache.prepare(config, tok, show_progress=False)
    assert val_stream_ids(DataStreams(config, tok, seed=0).val_batches(3)) == \
        val_stream_ids(DataStreams(plain, tok, seed=0).val_batches(3))


def test_word_sft_answer_bytes_include_spaces_and_unknown_words(tmp_path):
    corpus = "Q: who ?\nA: the cat sat\n"
    tok = build_tokenizer(TokenizerConfig(kind="word", vocab_size=100, min_frequency=1),
                          [corpus], 32)
    record = {"prompt": "Q: who ?\nA:", "completion": " the zebra  sat\non mat"}
    example = encode_record(record, tok, with_bytes=True)
    scored = example[1] != IGNORE_INDEX
    assert int(example[2][scored].sum()) == len(record["completion"].encode())


@pytest.mark.parametrize("kind", KINDS)
def test_stateful_validation_over_two_processes_scores_every_byte(tmp_path, monkeypatch, toks,
                                                                  kind):
    monkeypatch.setattr(sources, "PIECE_BYTES", 30)
    text = "".join(f"{NASTY} {i}  x\n" for i in range(25)) + "end"
    path = tmp_path / "val.txt"
    path.write_text(text)
    total = tokens = 0
    for rank in range(2):
        streams = DataStreams(val_config(path), toks[kind], seed=0, rank=rank, world_size=2,
                              stateful=True)
        n_bytes, n_tokens = scored_bytes_and_tokens(streams.val_batches(3))
        total, tokens = total + n_bytes, tokens + n_tokens
    one = scored_bytes_and_tokens(DataStreams(val_config(path), toks[kind], seed=0,
                                              stateful=True).val_batches(6))
    assert (total, tokens) == one
    assert total == len(text.encode())


def test_packed_training_batches_keep_examples_apart(tmp_path, sft_tok):
    """The same property as for validation, on what training actually feeds the model."""
    config = sft_config(tmp_path, packing=True, block_size=48, shuffle_tokens=0)
    stream = DataStreams(config, sft_tok, seed=0).train_batches(2)
    batch = next(stream)
    stream.close()
    torch.manual_seed(0)
    model = build_gpt2(GPT2Fields(n_layer=2, n_head=2, n_embd=16), sft_tok, 48).eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits
        for row in range(batch["input_ids"].shape[0]):
            positions = batch["position_ids"][row].tolist()
            starts = [0, *(i for i in range(1, len(positions)) if positions[i] == 0)]
            for begin, end in zip(starts, [*starts[1:], len(positions)], strict=True):
                alone = model(input_ids=batch["input_ids"][row:row + 1, begin:end]).logits
                torch.testing.assert_close(packed[row:row + 1, begin:end], alone,
                                           rtol=1e-5, atol=1e-5)


def test_token_cache_validation_over_two_processes_scores_every_byte(tmp_path, toks):
    tok = toks["byte_bpe"]
    text = "".join(f"{NASTY} {i}  x\n" for i in range(25))
    path = tmp_path / "val.txt"
    path.write_text(text)
    config = val_config(path, cache=str(tmp_path / "c"))
    token_cache.prepare(config, tok, show_progress=False)
    total = sum(scored_bytes_and_tokens(DataStreams(config, tok, seed=0, rank=r, world_size=2)
                                        .val_batches(3))[0] for r in range(2))
    assert total == len(text.encode())


def test_word_lstm_eval_equals_in_training_validation_with_line_breaks(tmp_path, capsys,
                                                                       shakespeare_text):
    """Issue 12 item 2: a word model, a one-document val file with blank lines, trailing
    spaces and unknown words; `hftrain eval` reports what training did (tokens, bytes,
    loss), and the bytes are the file's."""
    (tmp_path / "train.txt").write_text(shakespeare_text[:8_000])
    val = tmp_path / "val.txt"
    val.write_text(shakespeare_text[8_000:9_500].replace("\n\n", "\n  \n\n") + " zyzzyva \n")
    raw = tiny_recipe_dict(tmp_path / "train.txt", tmp_path / "run",
                           tokenizer={"kind": "word", "vocab_size": 300},
                           data={"val_files": [str(val)]},
                           train={"max_steps": 6}, eval={"interval": 6})
    raw["model"] = {"arch": "lstm", "embedding_size": 16, "hidden_size": 16, "num_layers": 1}
    raw["sample"] = {"prompt": "", "max_new_tokens": 5}
    result = train(recipe_from_dict(raw))
    capsys.readouterr()
    code, out, err = cli(["eval", str(result.final_dir), "--data", str(val), "--json"], capsys)
    assert code == 0, err
    got = json.loads(out)
    assert got["bytes"] == result.val["bytes"] == len(val.read_bytes())
    assert got["tokens"] == result.val["tokens"]
    assert got["loss"] == pytest.approx(result.val["loss"], rel=1e-5)
