"""GGUF export (issue 24): `hftrain export EXPORT --gguf FILE` writes what llama.cpp reads,
checked here with the `gguf` reader (llama.cpp's own package): the architecture's metadata,
the byte-level BPE vocabulary with GPT-2's pre-tokenizer, and every tensor, mapped and laid
out as llama.cpp's loader expects (GPT-2's Conv1D weights transposed, Llama's query and key
rows in adjacent rotary pairs); what llama.cpp cannot reproduce is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, tiny_recipe_dict
from safetensors.numpy import load_file

gguf = pytest.importorskip("gguf")

MODELS = {
    "gpt2": {"arch": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32},
    "llama": {"arch": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32,
              "tie_embeddings": False},
    "qwen3": {"arch": "qwen3", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32},
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, shakespeare_text) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    corpus = root / "corpus.txt"
    corpus.write_text(shakespeare_text)
    from hftrain.recipe import recipe_from_dict
    from hftrain.train import train

    made = {}
    for name, model in {**MODELS, "char": MODELS["gpt2"]}.items():
        recipe = tiny_recipe_dict(corpus, root / name, model=model,
                                  tokenizer={"kind": "char" if name == "char" else "byte_bpe",
                                             "vocab_size": 300},
                                  train={"max_steps": 3}, eval={"interval": 100},
                                  sample={"max_new_tokens": 0})
        recipe["model"] = model
        made[name] = train(recipe_from_dict(recipe)).final_dir
    return made


def field(reader, key: str):
    return reader.fields[key].contents()


@pytest.mark.parametrize("name", list(MODELS))
def test_the_gguf_holds_the_models_metadata_vocabulary_and_tensors(exports, tmp_path, capsys,
                                                                    name):
    export = exports[name]
    out = tmp_path / f"{name}.gguf"
    code, stdout, err = cli(["export", str(export), "--gguf", str(out)], capsys)
    assert code == 0, err
    assert f"wrote {out}" in stdout
    reader = gguf.GGUFReader(out)
    config = json.loads((export / "config.json").read_text())
    arch = field(reader, "general.architecture")
    assert arch == name
    positions = config.get("n_positions") or config.get("max_position_embeddings")
    assert field(reader, f"{arch}.context_length") == positions == 16
    assert field(reader, f"{arch}.block_count") == 2

    spec = json.loads((export / "tokenizer.json").read_text())
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == config["vocab_size"]
    for token, i in spec["model"]["vocab"].items():
        assert tokens[i] == token
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    merges = field(reader, "tokenizer.ggml.merges")
    assert merges[:3] == [" ".join(m) for m in spec["model"]["merges"][:3]]
    specials = {t["id"] for t in spec["added_tokens"] if t["special"]}
    types = field(reader, "tokenizer.ggml.token_type")
    assert {i for i, t in enumerate(types) if t == 3} == specials  # CONTROL
    eos = field(reader, "tokenizer.ggml.eos_token_id")
    assert tokens[eos] == "<|endoftext|>"

    weights = load_file(export / "model.safetensors")
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)
    if name == "gpt2":
        assert len(tensors) == 2 + 12 * 2 + 2  # embeddings, 12 a block, final norm; tied
        np.testing.assert_array_equal(tensors["token_embd.weight"],
                                      weights["transformer.wte.weight"])
        np.testing.assert_array_equal(tensors["blk.1.attn_qkv.weight"],
                                      weights["transformer.h.1.attn.c_attn.weight"].T)
        np.testing.assert_array_equal(tensors["blk.0.ffn_down.weight"],
                                      weights["transformer.h.0.mlp.c_proj.weight"].T)
        assert field(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
        return
    heads, kv_heads, head_dim = 4, 2, 8
    assert field(reader, f"{arch}.attention.head_count_kv") == kv_heads
    assert field(reader, f"{arch}.rope.dimension_count") == head_dim
    q = weights["model.layers.1.self_attn.q_proj.weight"]
    k = weights["model.layers.1.self_attn.k_proj.weight"]
    if name == "llama":  # rotate-half pairs (i, i + 4) become adjacent: rows 0, 4, 1, 5, ...
        order = np.array([0, 4, 1, 5, 2, 6, 3, 7])
        np.testing.assert_array_equal(tensors["blk.1.attn_q.weight"],
                                      q.reshape(heads, head_dim, -1)[:, order].reshape(q.shape))
        np.testing.assert_array_equal(tensors["blk.1.attn_k.weight"],
                                      k.reshape(kv_heads, head_dim, -1)[:, order].reshape(k.shape))
        np.testing.assert_array_equal(tensors["output.weight"], weights["lm_head.weight"])
    else:  # qwen3: llama.cpp rotates as transformers does; QK-norm weights go along
        np.testing.assert_array_equal(tensors["blk.1.attn_q.weight"], q)
        np.testing.assert_array_equal(tensors["blk.0.attn_k_norm.weight"],
                                      weights["model.layers.0.self_attn.k_norm.weight"])
        assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd
    assert field(reader, f"{arch}.rope.freq_base") == pytest.approx(config.get(
        "rope_theta") or config["rope_parameters"]["rope_theta"])


def test_a_gpt2_export_carries_n_ctx_for_converters(exports):
    config = json.loads((exports["gpt2"] / "config.json").read_text())
    assert config["n_ctx"] == config["n_positions"] == 16


def test_what_llama_cpp_cannot_reproduce_is_refused_in_one_line(exports, tmp_path, capsys):
    out = tmp_path / "x.gguf"
    code, _, err = cli(["export", str(exports["char"]), "--gguf", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "is not a byte-level BPE" in err and "tokenizer.kind: byte_bpe" in err
    assert not out.exists() and not list(tmp_path.iterdir())
    code, _, err = cli(["export", str(tmp_path / "missing"), "--gguf", str(out)], capsys)
    assert code == 2 and "export folder not found" in err


def test_a_recurrent_export_is_refused_in_one_line(tmp_path, capsys):
    export = tmp_path / "lstm"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({"model_type": "hftrain_recurrent"}))
    code, _, err = cli(["export", str(export), "--gguf", str(tmp_path / "x.gguf")], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "a 'hftrain_recurrent' model has no GGUF form" in err


def test_llama3_rope_scaling_and_a_missing_folder_are_refused_in_one_line(exports, tmp_path,
                                                                          capsys):
    import shutil

    export = tmp_path / "llama3"
    shutil.copytree(exports["llama"], export)
    config = json.loads((export / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 2.0}
    (export / "config.json").write_text(json.dumps(config))
    code, _, err = cli(["export", str(export), "--gguf", str(tmp_path / "x.gguf")], capsys)
    assert code == 2 and "rope scaling 'llama3' is not written to GGUF yet" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama3"]  # no partial file left
    code, _, err = cli(["export", str(exports["gpt2"]), "--gguf",
                        str(tmp_path / "none" / "x.gguf")], capsys)
    assert code == 2 and "no folder" in err, err


def damaged(exports, tmp_path: Path, change) -> Path:
    import shutil

    export = tmp_path / "export"
    shutil.copytree(exports["gpt2"], export)
    change(export)
    return export


def edit_json(path: Path, **values) -> None:
    data = json.loads(path.read_text())
    data.update(values)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("change, message", [
    (lambda e: edit_json(e / "tokenizer.json", normalizer={"type": "Lowercase"}),
     "its tokenizer changes text before or while merging"),
    (lambda e: (e / "tokenizer_config.json").unlink(), "names no EOS token"),
    (lambda e: (e / "model.safetensors").write_bytes(b"\x00" * 100), "cannot read"),
    (lambda e: (e / "config.json").write_text("[]"), "holds list, not a JSON object"),
    (lambda e: edit_json(e / "config.json", n_layer=5), "lack 'h.2.ln_1.weight'"),
])
def test_a_damaged_or_unsupported_export_is_one_line(exports, tmp_path, capsys, change,
                                                     message):
    export = damaged(exports, tmp_path, change)
    out = tmp_path / "x.gguf"
    code, _, err = cli(["export", str(export), "--gguf", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # nothing left behind


def test_added_tokens_that_are_not_special_are_user_defined(exports, tmp_path, capsys):
    """llama.cpp matches user-defined tokens in the text as written, as transformers does."""
    def unspecial(export: Path) -> None:
        spec = json.loads((export / "tokenizer.json").read_text())
        for token in spec["added_tokens"]:
            token["special"] = token["content"] != "<|turn|>"
        (export / "tokenizer.json").write_text(json.dumps(spec))

    export = damaged(exports, tmp_path, unspecial)
    out = tmp_path / "x.gguf"
    assert cli(["export", str(export), "--gguf", str(out)], capsys)[0] == 0
    reader = gguf.GGUFReader(out)
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader,
                                                                  "tokenizer.ggml.token_type")
    assert types[tokens.index("<|turn|>")] == 4 and types[tokens.index("<|endoftext|>")] == 3


def test_a_link_or_a_file_at_the_target_is_never_replaced(exports, tmp_path, capsys):
    link = tmp_path / "link.gguf"
    link.symlink_to(tmp_path / "nowhere")
    code, _, err = cli(["export", str(exports["gpt2"]), "--gguf", str(link)], capsys)
    assert code == 2 and "exists" in err and link.is_symlink()
    partial = tmp_path / ".x.gguf.partial"  # a name hftrain's own partial files never take
    partial.write_text("mine")
    assert cli(["export", str(exports["gpt2"]), "--gguf", str(tmp_path / "x.gguf")],
               capsys)[0] == 0
    assert partial.read_text() == "mine"


def test_an_existing_file_is_never_replaced(exports, tmp_path, capsys):
    out = tmp_path / "mine.gguf"
    out.write_text("my notes")
    code, _, err = cli(["export", str(exports["gpt2"]), "--gguf", str(out)], capsys)
    assert code == 2 and f"{out} exists" in err
    assert out.read_text() == "my notes"


@pytest.mark.slow  # needs llama-cpp-python, which compiles llama.cpp when installed
def test_llama_cpp_reads_scores_and_continues_the_gguf_as_hftrain_does(exports):
    """benchmarks/gguf_agreement.py on the three tiny exports: the same tokens, the total NLL
    within 0.1% and the same greedy continuation (the script exits 1 otherwise)."""
    pytest.importorskip("llama_cpp")
    import subprocess
    import sys

    from conftest import REPO

    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gguf_agreement.py"),
                           *(str(exports[n]) for n in MODELS), "--chars", "1500",
                           "--new-tokens", "8"], capture_output=True, text=True, cwd=REPO,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert done.stdout.count("tokens equal;") == 3 and done.stdout.count("greedy equal") == 3
