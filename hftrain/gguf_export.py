"""An export as one GGUF file, for llama.cpp and what builds on it (Ollama, LM Studio).

Written with `gguf`, the writer llama.cpp maintains on PyPI. llama.cpp's own converter
(`convert_hf_to_gguf.py`) cannot convert hftrain's exports: it recognises a BPE pre-tokenizer by
hashing the ids it gives a fixed text, which no tokenizer trained from scratch matches. hftrain
knows what its tokenizers do, so it says it: a byte-level BPE trained by hftrain (or GPT-2's
own) splits text with GPT-2's regex before merging, which is llama.cpp's pre-tokenizer
`gpt-2` (llama-vocab.cpp maps it to LLAMA_VOCAB_PRE_TYPE_GPT2, whose splitter implements
`'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+`), and
its vocabulary is already byte-level encoded (`Ġ` for a space), as llama.cpp's `gpt2` model
expects.

What is refused, in one line each: tokenizers llama.cpp cannot reproduce exactly (hftrain's
`char` and `word` kinds: llama.cpp drops a character or word its vocabulary lacks where
hftrain's tokenizer gives `<|unk|>`, and `word`'s whitespace split is no llama.cpp
pre-tokenizer), recurrent models (no llama.cpp architecture), `llama3` rope scaling (its
frequency table is not written yet) and any other architecture.

Tensor layout (llama.cpp's loader checks every shape and the number of tensors): GPT-2's
Conv1D weights are stored [in, out] and are transposed; Llama's query and key rows are
permuted from transformers' rotate-half pairs (i, i + d/2) to the adjacent pairs llama.cpp's
`llama` rope rotates; Qwen3 uses the rotate-half (NEOX) rope in llama.cpp too, so its rows
stay. Tied embeddings write no `output.weight` (llama.cpp reads `token_embd`). Weights are
written as float32: the file scores as the export does.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from hftrain.atomic import write_error_reason
from hftrain.errors import HftrainError, one_line

CONTROL, NORMAL, USER_DEFINED, UNUSED = 3, 1, 4, 5
"""llama.cpp's token types (gguf.TokenType)."""


def write_gguf(export: Path, out: Path) -> Path:
    """Write the export folder `export` as the GGUF file `out` (atomically: a file beside it,
    renamed when complete). Refuses, in one line, what llama.cpp cannot run as hftrain does."""
    import gguf

    if not export.is_dir():
        hub = "" if export.is_absolute() or str(export).startswith(".") else \
            " (a Hub model: download it first, e.g. hf download ID --local-dir DIR)"
        raise HftrainError(f"export folder not found: {export}{hub}")
    config = _read_json(export / "config.json")
    family = FAMILIES.get(config.get("model_type", ""))
    if family is None:
        raise HftrainError(f"{export}: a '{config.get('model_type')}' model has no GGUF form "
                           f"hftrain writes (GPT-2, Llama and Qwen3 do)")
    tokenizer = _byte_level_bpe(export)
    weights = _weights(export)
    _check_target(out)
    descriptor, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial",
                                        dir=out.parent)  # a new file of hftrain's own
    os.close(descriptor)
    partial = Path(name)
    try:
        _write(gguf.GGUFWriter(str(partial), family.arch), family, export, config, tokenizer,
               weights)
        os.link(partial, out)  # never replaces: a file that appeared meanwhile stays
    except FileExistsError:
        raise HftrainError(f"{out} exists; hftrain writes a new file only") from None
    except OSError as exc:  # a read-only folder, a full disk
        raise HftrainError(f"could not write {out} ({write_error_reason(exc)})") from None
    except KeyError as exc:
        raise HftrainError(f"{export}: config.json or the weights lack {exc}, which a "
                           f"'{family.arch}' model has") from None
    finally:
        partial.unlink(missing_ok=True)
    return out


def client_hint(export: Path, out: Path) -> str:
    """How to run the file with llama.cpp: a GPT-2 has a fixed number of learned positions,
    and llama.cpp stops with an assertion past them, so its output length is bounded."""
    config = _read_json(export / "config.json")
    if config.get("model_type") != "gpt2":
        return f"llama-cli -m {out} -p 'ROMEO:'"
    positions = int(config["n_positions"])
    return (f"llama-cli -m {out} -n {positions // 2} -p 'ROMEO:' (a GPT-2 has {positions} "
            "positions for prompt and output together: llama.cpp stops with an assertion past "
            "them)")


def _check_target(out: Path) -> None:
    if out.is_dir():
        raise HftrainError(f"{out} is a folder; name the GGUF file to write")
    if out.exists() or out.is_symlink():
        raise HftrainError(f"{out} exists; hftrain writes a new file only (remove it or name "
                           "another)")
    if not out.parent.is_dir():
        raise HftrainError(f"cannot write {out}: no folder {out.parent}")


def _write(writer: Any, family: Family, export: Path, config: dict[str, Any],
           tokenizer: dict[str, Any], weights: dict[str, np.ndarray]) -> None:
    import gguf

    try:
        folder = export.resolve()
        writer.add_name(folder.parent.name if folder.name == "final" else folder.name)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        family.metadata(writer, config)
        _tokenizer(writer, tokenizer, int(config["vocab_size"]))
        for name, tensor in family.tensors(weights, config):
            writer.add_tensor(name, np.ascontiguousarray(tensor, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise HftrainError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise HftrainError(f"{path} is not JSON") from None
    if not isinstance(data, dict):
        raise HftrainError(f"{path} holds {type(data).__name__}, not a JSON object")
    return data


def _weights(export: Path) -> dict[str, np.ndarray]:
    """Every tensor of the export's safetensors files, as float32 arrays."""
    from safetensors.torch import load_file

    files = sorted(export.glob("*.safetensors"))
    if not files:
        raise HftrainError(f"{export} holds no .safetensors weights")
    weights = {}
    for file in files:
        try:
            weights.update({name: t.float().numpy() for name, t in load_file(file).items()})
        except Exception as exc:  # noqa: BLE001 - safetensors' errors for a damaged file
            raise HftrainError(f"cannot read {file}: {one_line(exc)}") from None
    return weights


def _byte_level_bpe(export: Path) -> dict[str, Any]:
    """The export's tokenizer (tokenizer.json and its special tokens), if it is a byte-level
    BPE that splits with GPT-2's regex; refused otherwise."""
    spec = _read_json(export / "tokenizer.json")
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    byte_level = pre.get("type") == "ByteLevel" and pre.get("use_regex", True) \
        and not pre.get("add_prefix_space", False)
    if spec.get("normalizer") or model.get("dropout") or model.get("ignore_merges") \
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise HftrainError(f"{export}: its tokenizer changes text before or while merging "
                           "(a normalizer, BPE dropout, ignore_merges or subword affixes), "
                           "which llama.cpp's gpt2 tokenizer does not; it would read text "
                           "differently")
    if model.get("type") != "BPE" or not byte_level or not model.get("merges"):
        kind = model.get("type", "unknown")
        raise HftrainError(
            f"{export}: its tokenizer ({kind}, pre-tokenizer {pre.get('type')}) is not a "
            "byte-level BPE; llama.cpp would tokenize it differently (a character or word "
            "its vocabulary lacks is dropped there, not read as <|unk|>), so hftrain writes "
            "GGUF for byte-level BPE tokenizers only (tokenizer.kind: byte_bpe)")
    settings = _read_json(export / "tokenizer_config.json") \
        if (export / "tokenizer_config.json").is_file() else {}
    template = export / "chat_template.jinja"
    if template.is_file():
        settings["chat_template"] = template.read_text(encoding="utf-8")
    return {"spec": spec, "settings": settings}


def _tokenizer(writer: Any, tokenizer: dict[str, Any], n_rows: int) -> None:
    """The `gpt2`-model vocabulary: tokens by id (padded to the embedding's rows with unused
    ones), added tokens as control (special) or user-defined ones, merges as "a b", the
    special ids (an EOS is required) and the add-BOS flag."""
    spec, settings = tokenizer["spec"], tokenizer["settings"]
    vocab: dict[int, str] = {i: token for token, i in spec["model"]["vocab"].items()}
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    vocab.update({i: t["content"] for i, t in added.items()})
    if max(vocab) >= n_rows:
        raise HftrainError(f"the tokenizer has ids up to {max(vocab)}, past the model's "
                           f"{n_rows} embedding rows")
    tokens = [vocab.get(i, f"[PAD{i}]") for i in range(n_rows)]
    # added tokens are matched in the text as written, before BPE: llama.cpp's control
    # tokens (special) and user-defined ones (the others), stored as their raw text
    types = [(CONTROL if added[i].get("special") else USER_DEFINED) if i in added
             else NORMAL if i in vocab else UNUSED for i in range(n_rows)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    by_text = {text: i for i, text in vocab.items()}
    ids = {}
    for role, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        text = settings.get(f"{role}_token")
        if isinstance(text, dict):
            text = text.get("content")
        if text in by_text:
            ids[role] = by_text[text]
            add(ids[role])
    if "eos" not in ids:  # llama.cpp would fall back to its default, id 11, and stop there
        raise HftrainError("the export's tokenizer names no EOS token in its vocabulary "
                           "(tokenizer_config.json eos_token)")
    # hftrain frames every document after the start token (the BOS): a client that puts it
    # first scores and continues text as the model was trained (llama.cpp does, with this)
    writer.add_add_bos_token("bos" in ids)
    writer.add_add_eos_token(False)
    if settings.get("chat_template"):
        writer.add_chat_template(settings["chat_template"])


class Family:
    """How one architecture's config and weights map to llama.cpp's."""

    arch = ""

    def metadata(self, writer: Any, config: dict[str, Any]) -> None:
        raise NotImplementedError

    def tensors(self, weights: dict[str, np.ndarray],
                config: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
        raise NotImplementedError


class GPT2(Family):
    arch = "gpt2"

    def metadata(self, writer: Any, config: dict[str, Any]) -> None:
        if config.get("activation_function") not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            raise HftrainError(f"llama.cpp's GPT-2 uses GELU; this model uses "
                               f"{config.get('activation_function')}")
        n_embd = int(config["n_embd"])
        writer.add_context_length(int(config["n_positions"]))
        writer.add_embedding_length(n_embd)
        writer.add_block_count(int(config["n_layer"]))
        writer.add_feed_forward_length(int(config.get("n_inner") or 4 * n_embd))
        writer.add_head_count(int(config["n_head"]))
        writer.add_layer_norm_eps(float(config.get("layer_norm_epsilon", 1e-5)))

    def tensors(self, weights: dict[str, np.ndarray],
                config: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
        w = {k.removeprefix("transformer."): v for k, v in weights.items()}
        out = [("token_embd.weight", w["wte.weight"]), ("position_embd.weight", w["wpe.weight"])]
        for i in range(int(config["n_layer"])):
            h = f"h.{i}."
            out += [(f"blk.{i}.attn_norm.weight", w[h + "ln_1.weight"]),
                    (f"blk.{i}.attn_norm.bias", w[h + "ln_1.bias"]),
                    (f"blk.{i}.attn_qkv.weight", w[h + "attn.c_attn.weight"].T),
                    (f"blk.{i}.attn_qkv.bias", w[h + "attn.c_attn.bias"]),
                    (f"blk.{i}.attn_output.weight", w[h + "attn.c_proj.weight"].T),
                    (f"blk.{i}.attn_output.bias", w[h + "attn.c_proj.bias"]),
                    (f"blk.{i}.ffn_norm.weight", w[h + "ln_2.weight"]),
                    (f"blk.{i}.ffn_norm.bias", w[h + "ln_2.bias"]),
                    (f"blk.{i}.ffn_up.weight", w[h + "mlp.c_fc.weight"].T),
                    (f"blk.{i}.ffn_up.bias", w[h + "mlp.c_fc.bias"]),
                    (f"blk.{i}.ffn_down.weight", w[h + "mlp.c_proj.weight"].T),
                    (f"blk.{i}.ffn_down.bias", w[h + "mlp.c_proj.bias"])]
        out += [("output_norm.weight", w["ln_f.weight"]), ("output_norm.bias", w["ln_f.bias"])]
        return out + _output(weights, config)


class Llama(Family):
    arch = "llama"
    permute = True
    """transformers rotates pairs (i, i + d/2), llama.cpp's `llama` rope adjacent pairs."""

    def metadata(self, writer: Any, config: dict[str, Any]) -> None:
        heads = int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
        writer.add_context_length(int(config["max_position_embeddings"]))
        writer.add_embedding_length(int(config["hidden_size"]))
        writer.add_block_count(int(config["num_hidden_layers"]))
        writer.add_feed_forward_length(int(config["intermediate_size"]))
        writer.add_head_count(heads)
        writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        writer.add_rope_freq_base(float(rope.get("rope_theta") or config.get("rope_theta")
                                        or 10000.0))
        _rope_scaling(writer, rope)

    def tensors(self, weights: dict[str, np.ndarray],
                config: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        out = [("token_embd.weight", weights["model.embed_tokens.weight"])]
        for i in range(int(config["num_hidden_layers"])):
            p = f"model.layers.{i}."
            q, k = weights[p + "self_attn.q_proj.weight"], weights[p + "self_attn.k_proj.weight"]
            if self.permute:
                q, k = _pairs_adjacent(q, heads), _pairs_adjacent(k, kv_heads)
            out += [(f"blk.{i}.attn_norm.weight", weights[p + "input_layernorm.weight"]),
                    (f"blk.{i}.attn_q.weight", q), (f"blk.{i}.attn_k.weight", k),
                    (f"blk.{i}.attn_v.weight", weights[p + "self_attn.v_proj.weight"]),
                    (f"blk.{i}.attn_output.weight", weights[p + "self_attn.o_proj.weight"]),
                    (f"blk.{i}.ffn_norm.weight", weights[p + "post_attention_layernorm.weight"]),
                    (f"blk.{i}.ffn_gate.weight", weights[p + "mlp.gate_proj.weight"]),
                    (f"blk.{i}.ffn_up.weight", weights[p + "mlp.up_proj.weight"]),
                    (f"blk.{i}.ffn_down.weight", weights[p + "mlp.down_proj.weight"])]
            out += self.extra(weights, p, i)
            biases = [n for n in ("q", "k", "v", "o") if p + f"self_attn.{n}_proj.bias" in weights]
            if biases:
                raise HftrainError("attention biases are not written to GGUF yet")
        out += [("output_norm.weight", weights["model.norm.weight"])]
        return out + _output(weights, config)

    def extra(self, weights: dict[str, np.ndarray], prefix: str,
              i: int) -> list[tuple[str, np.ndarray]]:
        return []


class Qwen3(Llama):
    arch = "qwen3"
    permute = False
    """llama.cpp's `qwen3` rotates as transformers does (NEOX rope: pairs (i, i + d/2))."""

    def extra(self, weights: dict[str, np.ndarray], prefix: str,
              i: int) -> list[tuple[str, np.ndarray]]:
        return [(f"blk.{i}.attn_q_norm.weight", weights[prefix + "self_attn.q_norm.weight"]),
                (f"blk.{i}.attn_k_norm.weight", weights[prefix + "self_attn.k_norm.weight"])]


FAMILIES: dict[str, Family] = {"gpt2": GPT2(), "llama": Llama(), "qwen3": Qwen3()}


def _output(weights: dict[str, np.ndarray], config: dict[str, Any]) -> list[tuple[str, Any]]:
    """`output.weight` unless the head is tied to the embedding (llama.cpp then reads
    `token_embd.weight`)."""
    if config.get("tie_word_embeddings", True) or "lm_head.weight" not in weights:
        return []
    return [("output.weight", weights["lm_head.weight"])]


def _pairs_adjacent(weight: np.ndarray, heads: int) -> np.ndarray:
    """Query or key rows reordered within each head from rotate-half pairs (i, i + d/2) to
    adjacent pairs (2i, 2i + 1): row 2i + j of a head becomes its row j x d/2 + i."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _rope_scaling(writer: Any, rope: dict[str, Any]) -> None:
    import gguf

    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "default":
        return
    if kind not in ("linear", "yarn"):
        raise HftrainError(f"rope scaling '{kind}' is not written to GGUF yet (linear and yarn "
                           "are)")
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN if kind == "yarn"
                                 else gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(float(rope["factor"]))
    if rope.get("original_max_position_embeddings"):
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
