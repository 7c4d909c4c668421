"""Recurrent LMs: the transformers contract, remote code without hftrain, state as cache,
stateful (truncated BPTT) lanes, and training end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from conftest import tiny_recipe_dict

from hftrain.data import IGNORE_INDEX, collate, lane_windows
from hftrain.errors import RecipeError
from hftrain.evaluation import evaluate_lm
from hftrain.models.recurrent.modeling_recurrent import recurrent_cache
from hftrain.models.rnn import RecurrentFields, build_recurrent
from hftrain.recipe import TokenizerConfig, recipe_from_dict
from hftrain.tokenizer import build_tokenizer
from hftrain.tracking import read_metrics
from hftrain.train import train

CELLS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]


@pytest.fixture(scope="module")
def tokenizer(shakespeare_text):
    return build_tokenizer(TokenizerConfig(kind="char"), [shakespeare_text], 32)


def tiny(tokenizer, cell="lstm", **overrides):
    torch.manual_seed(0)
    sizes = {"embedding_size": 16, "hidden_size": 24, "num_layers": 2, **overrides}
    fields = RecurrentFields(arch=cell, **sizes)
    return build_recurrent(fields, tokenizer, 32).eval()


REMOTE_LOAD = r"""
import json, sys
sys.modules["hftrain"] = None  # `import hftrain` fails in this process
import torch
from transformers import AutoModelForCausalLM
results = {}
for path in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    ids = torch.tensor([[5, 9, 12, 7, 30, 4, 11]])
    with torch.no_grad():
        logits = model(ids).logits
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    results[path] = {"logits": logits.tolist(), "generated": out.tolist(),
                     "module": type(model).__module__}
print(json.dumps(results))
"""


def test_every_cell_loads_as_remote_code_without_hftrain(tokenizer, tmp_path):
    models = {}
    for cell in CELLS:
        models[cell] = tiny(tokenizer, cell)
        models[cell].save_pretrained(tmp_path / cell)
        saved = {p.name for p in (tmp_path / cell).iterdir()}
        assert {"modeling_recurrent.py", "configuration_recurrent.py",
                "model.safetensors"} <= saved
        auto_map = json.loads((tmp_path / cell / "config.json").read_text())["auto_map"]
        assert auto_map["AutoModelForCausalLM"] == "modeling_recurrent.RecurrentForCausalLM"
    proc = subprocess.run([sys.executable, "-c", REMOTE_LOAD,
                           *(str(tmp_path / c) for c in CELLS)],
                          capture_output=True, text=True, check=True)
    remote = json.loads(proc.stdout)
    ids = torch.tensor([[5, 9, 12, 7, 30, 4, 11]])
    for cell in CELLS:
        got = remote[str(tmp_path / cell)]
        assert not got["module"].startswith("hftrain")
        with torch.no_grad():
            ours = models[cell](ids).logits
        assert torch.allclose(ours, torch.tensor(got["logits"]), atol=1e-6, rtol=0), cell
        expected = models[cell].generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert got["generated"] == expected.tolist(), cell


def test_loading_remote_code_needs_trust_remote_code(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    tiny(tokenizer).save_pretrained(tmp_path / "m")
    code = ("import sys; sys.modules['hftrain'] = None\n"
            "from transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode != 0 and "trust_remote_code" in proc.stderr
    # where hftrain is imported, the Auto classes know the model natively
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "m")).__name__ == \
        "RecurrentForCausalLM"


@pytest.mark.parametrize("cell", CELLS)
def test_labels_are_shifted_inside_and_ignored_labels_skipped(tokenizer, cell):
    model = tiny(tokenizer, cell)
    ids = torch.randint(4, len(tokenizer), (2, 12))
    labels = ids.clone()
    labels[1, 5:] = IGNORE_INDEX
    out = model(ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                               ignore_index=IGNORE_INDEX)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("cell", CELLS)
def test_state_is_the_cache(tokenizer, cell):
    """Feeding a sequence in two pieces with the state equals feeding it whole, and greedy
    generate (one token per step) equals recomputing the whole prefix every step."""
    model = tiny(tokenizer, cell)
    ids = torch.randint(4, len(tokenizer), (2, 15))
    with torch.no_grad():
        whole = model(ids).logits
        first = model(ids[:, :9])
        second = model(ids[:, 9:], cache=recurrent_cache(first))
        assert torch.allclose(torch.cat([first.logits, second.logits], 1), whole, atol=1e-6)
        generated = model.generate(ids[:, :5], max_new_tokens=10, do_sample=False,
                                   pad_token_id=0)
        recomputed = ids[:, :5]
        for _ in range(10):
            next_token = model(recomputed).logits[:, -1:].argmax(-1)
            recomputed = torch.cat([recomputed, next_token], 1)
    assert torch.equal(generated, recomputed)


@pytest.mark.parametrize("cell", CELLS)
def test_generate_feeds_one_token_per_forward_after_the_prompt(tokenizer, cell):
    """The cost of a generated token does not grow with the prefix, whatever this version of
    transformers calls the cache (transformers 5.25 renamed past_key_values to cache, and a
    model reading only the old name silently re-read the whole prefix at every token)."""
    model = tiny(tokenizer, cell)
    lengths: list[int] = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append((args[0] if args else
                                                     kwargs["input_ids"]).shape[1]),
        with_kwargs=True)
    ids = torch.randint(4, len(tokenizer), (2, 7))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert lengths == [7] + [1] * 11


def test_sampling_and_resized_embeddings(tokenizer):
    model = tiny(tokenizer, hidden_size=40)  # hidden != embedding: tied through a projection
    assert model.projection is not None
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    model.resize_token_embeddings(len(tokenizer) + 5)
    assert model.lm_head.weight.shape[0] == len(tokenizer) + 5
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    out = model.generate(torch.tensor([[5, 6]]), max_new_tokens=8, do_sample=True, top_k=5,
                         top_p=0.9, pad_token_id=0)
    assert out.shape == (1, 10)


def test_lanes_cover_every_token_once_and_rows_continue_their_lane():
    tokens = np.arange(1, 104, dtype=np.int64)  # 103 tokens: 102 targets
    windows = list(lane_windows(tokens, n_lanes=4, window=5, pad_tail=True))
    lane_len = 26  # ceil(102 / 4)
    assert len(windows) == 6 and all(np.stack(w).shape == (4, 6) for w in windows)
    targets = [t for w in windows for row in w for t in row[1:] if t != IGNORE_INDEX]
    assert sorted(targets) == list(range(2, 104))
    for j in range(4):  # row j of window i+1 starts where row j of window i ended
        for a, b in zip(windows, windows[1:], strict=False):
            assert a[j][-1] == b[j][0] or b[j][0] == IGNORE_INDEX
        assert windows[0][j][0] == 1 + j * lane_len
    dropped = list(lane_windows(tokens, n_lanes=4, window=5, pad_tail=False))
    kept = [t for w in dropped for row in w for t in row[1:] if t != IGNORE_INDEX]
    assert len(kept) == (102 // 4) * 4  # the classic batchify drops 102 mod 4 targets


def test_stateful_evaluation_equals_one_pass_over_each_lane(tokenizer):
    model = tiny(tokenizer)
    tokens = np.random.default_rng(0).integers(4, len(tokenizer), size=200)
    batches = []
    for i, rows in enumerate(lane_windows(tokens, n_lanes=3, window=16, pad_tail=True)):
        batch = collate(rows, 3, tokenizer.pad_token_id)
        batch["reset_state"] = i == 0
        batch["byte_counts"] = torch.ones_like(batch["labels"])
        batches.append(batch)
    result = evaluate_lm(model, batches, Accelerator(cpu=True), stateful=True)
    lane_len = -(-199 // 3)
    padded = np.concatenate([tokens, np.full(lane_len * 3 - 199, IGNORE_INDEX)])
    nll, count = 0.0, 0
    with torch.no_grad():
        for j in range(3):
            lane = torch.tensor(padded[j * lane_len : (j + 1) * lane_len + 1])
            real = lane[lane != IGNORE_INDEX]
            logits = model(real[None, :-1]).logits[0]
            nll += F.cross_entropy(logits, real[1:], reduction="sum").item()
            count += len(real) - 1
    assert result["tokens"] == count == 199
    assert result["loss"] == pytest.approx(nll / count, rel=1e-5)


def test_stateful_training_end_to_end(tmp_path, corpus_file, shakespeare_text):
    data = tiny_recipe_dict(corpus_file, tmp_path / "run",
                            train={"stateful": True, "max_steps": 40, "batch_size": 4},
                            eval={"interval": 20, "batch_size": 3},
                            data={"block_size": 32})
    data["model"] = {"arch": "lstm", "embedding_size": 32, "hidden_size": 64, "num_layers": 1,
                     "dropout": 0.0, "output_dropout": 0.0}
    result = train(recipe_from_dict(data))
    records = read_metrics(result.run_dir / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 0.5
    held_out = shakespeare_text[int(len(shakespeare_text) * 0.9):]
    # every character (the first after the start token) and the final EOS
    assert result.val["tokens"] == len(held_out) + 1
    assert result.val["bytes"] == len(held_out.encode())
    assert (result.final_dir / "modeling_recurrent.py").exists()
    assert result.sample.startswith("ROMEO:")


def test_stateful_needs_a_recurrent_model(tmp_path, corpus_file):
    data = tiny_recipe_dict(corpus_file, tmp_path / "run", train={"stateful": True})
    with pytest.raises(RecipeError, match="train.stateful needs a recurrent model"):
        recipe_from_dict(data)


def test_packed_training_works_for_recurrent_models_too(tmp_path, corpus_file):
    data = tiny_recipe_dict(corpus_file, tmp_path / "run", train={"max_steps": 10})
    data["model"] = {"arch": "gru", "embedding_size": 16, "hidden_size": 16, "num_layers": 1}
    result = train(recipe_from_dict(data))
    assert np.isfinite(result.val["perplexity"])
    assert Path(result.final_dir / "config.json").exists()
