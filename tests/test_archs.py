"""Llama-style architectures (issue 13): `arch: llama` and `arch: qwen3`, built from transformers'
own classes, go through everything GPT-2 goes through: training, an export that loads without
hftrain with equal logits, generation, `hftrain eval`, a push dry run, LoRA, `init_from`,
resume after kill -9, torchrun, and packed fine-tuning examples that do not see each other."""

from __future__ import annotations

import copy
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_packed_examples_apart, cli, logits_of, tiny_recipe_dict
from test_train import assert_export_agrees

from hftrain.errors import HftrainError, RecipeError
from hftrain.models import MODELS, build_model
from hftrain.models.llama import LlamaFields, Qwen3Fields, build_decoder
from hftrain.recipe import TokenizerConfig, load_recipe, recipe_from_dict
from hftrain.tokenizer import build_tokenizer
from hftrain.tracking import flops_per_token, read_metrics
from hftrain.train import train

ARCHS = ["llama", "qwen3"]
TINY = {"n_layer": 1, "n_head": 4, "n_kv_head": 2, "n_embd": 32}


def tiny_model(arch: str, **fields) -> dict:
    return {"arch": arch, **TINY, **fields}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shakespeare_text):
    """A tiny model of each arch, 60 steps, validated on its own file (for `hftrain eval`)."""
    root = tmp_path_factory.mktemp("archs")
    (root / "train.txt").write_text(shakespeare_text[:16_000])
    (root / "val.txt").write_text(shakespeare_text[16_000:])
    result = {"val_file": root / "val.txt", "train_file": root / "train.txt"}
    for arch in ARCHS:
        raw = tiny_recipe_dict(root / "train.txt", root / arch,
                               data={"val_files": [str(root / "val.txt")]},
                               train={"max_steps": 60}, eval={"interval": 30})
        raw["model"] = tiny_model(arch)
        result[arch] = train(recipe_from_dict(raw))
    return result


@pytest.fixture(scope="module")
def tok(shakespeare_text):
    return build_tokenizer(TokenizerConfig(kind="char"), [shakespeare_text], 16)


# --- the models and their fields ---------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_fields_become_the_transformers_config(arch, tok):
    fields = MODELS[arch].fields(n_layer=2, n_head=4, n_kv_head=1, n_embd=32, rope_theta=500.0,
                                 tie_embeddings=False, dropout=0.1)
    model = build_decoder(fields, tok, 48)
    config = model.config
    assert config.model_type == arch and type(model).__name__.lower().startswith(arch)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.hidden_size, config.head_dim) == (2, 4, 1, 32, 8)
    assert config.intermediate_size == 96  # 8/3 x 32 rounded up to a multiple of 32
    assert config.max_position_embeddings == 48 and config.vocab_size == len(tok)
    assert config.rope_parameters["rope_theta"] == 500.0
    assert config.attention_dropout == 0.1 and not config.tie_word_embeddings
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == \
        (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert model.model.layers[0].self_attn.k_proj.out_features == 8  # one key-value head
    assert hasattr(model.model.layers[0].self_attn, "q_norm") == (arch == "qwen3")
    n_params = sum(p.numel() for p in model.parameters())
    assert flops_per_token(model, 48) == 6 * n_params + 12 * 2 * 4 * 8 * 48  # layers heads width
    tied = build_decoder(MODELS[arch].fields(**TINY), tok, 16)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


@pytest.mark.parametrize(("override", "key"), [
    ("model.n_kv_head=3", "model.n_kv_head"),  # does not divide n_head 4
    ("model.n_kv_head=0", "model.n_kv_head"),
    ("model.n_head=6", "model.n_embd"),  # 32 is not divisible by 6
    ("model.head_dim=7", "model.head_dim"),  # rotary positions need an even width
    ("model.intermediate_size=0", "model.intermediate_size"),
    ("model.rope_theta=0", "model.rope_theta"),
    ("model.rms_norm_eps=-1", "model.rms_norm_eps"),
    ("model.dropout=1", "model.dropout"),
    ("model.n_kv_heads=2", "model.n_kv_head"),  # a misspelt key: did you mean
])
@pytest.mark.parametrize("arch", ARCHS)
def test_bad_fields_are_one_line_recipe_errors_naming_the_key(tmp_path, corpus_file, capsys,
                                                             arch, override, key):
    path = tmp_path / "r.yaml"
    raw = tiny_recipe_dict(corpus_file, tmp_path / "out")
    raw["model"] = tiny_model(arch)
    path.write_text(json.dumps(raw))
    with pytest.raises(RecipeError) as error:
        load_recipe(path, [override])
    message = str(error.value)
    assert "\n" not in message and key in message and str(path) in message
    code, _, err = cli(["train", str(path), override], capsys)
    assert code != 0 and err.strip() == f"hftrain: error: {message}"
    assert not (tmp_path / "out").exists()


def test_head_dim_may_differ_from_width_over_heads(tok):
    model = build_decoder(Qwen3Fields(n_layer=1, n_head=3, n_kv_head=1, n_embd=32, head_dim=16),
                          tok, 16)
    assert model.model.layers[0].self_attn.q_proj.out_features == 48
    assert model(input_ids=torch.tensor([[1, 5, 6]])).logits.shape == (1, 3, len(tok))


def test_shipped_llama_recipe_is_about_the_gpt2_demos_size(tok):
    recipe = load_recipe(REPO / "recipes/shakespeare/llama-char.yaml")
    gpt2 = load_recipe(REPO / "recipes/shakespeare/gpt2-char.yaml")
    assert isinstance(recipe.model, LlamaFields) and recipe.data.block_size == 64
    sizes = [sum(p.numel() for p in build_model(r.model, tok, r.data.block_size).parameters())
             for r in (recipe, gpt2)]
    assert 0.8 < sizes[0] / sizes[1] < 1.2


# --- train, export, reload, generate, eval, push -----------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_training_lowers_loss_and_exports_a_plain_transformers_folder(runs, arch):
    result = runs[arch]
    records = read_metrics(result.run_dir / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r["val_loss"] for r in records if "val_loss" in r]
    assert losses[-1] < losses[0] - 0.5 and evals[-1] < evals[0]
    config = json.loads((result.final_dir / "config.json").read_text())
    assert config["model_type"] == arch and "auto_map" not in config
    assert config["max_position_embeddings"] == 16
    assert result.sample.startswith("ROMEO:") and len(result.sample) > len("ROMEO:")


@pytest.mark.parametrize("arch", ARCHS)
def test_export_loads_without_hftrain_and_agrees(runs, arch, tmp_path):
    text = runs["train_file"].read_text() + runs["val_file"].read_text()
    assert len(text) == 20_000  # the last 20% of it is exactly the validation file
    text_path = tmp_path / "all.txt"
    text_path.write_text(text)
    out = subprocess.run([sys.executable, str(REPO / "tests" / "independent_check.py"),
                          str(runs[arch].final_dir), str(text_path), "0.2"],
                         capture_output=True, text=True, check=True)
    assert_export_agrees(runs[arch], json.loads(out.stdout))


GENERATE_WITHOUT_HFTRAIN = """
import json, sys
sys.modules["hftrain"] = None
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
tok = AutoTokenizer.from_pretrained(sys.argv[1])
ids = tok("ROMEO:", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=5, do_sample=False)
print(json.dumps({"class": type(model).__name__, "length": out.shape[1]}))
"""


@pytest.mark.parametrize("arch", ARCHS)
def test_generates_with_and_without_hftrain(runs, arch, capsys):
    final = runs[arch].final_dir
    code, out, _ = cli(["generate", str(final), "--prompt", "ROMEO:", "--max-new-tokens", "40",
                        "--seed", "0"], capsys)
    assert code == 0 and out.startswith("ROMEO:") and len(out.strip()) > len("ROMEO:")
    # past the 16 positions: the window moves on as it does for GPT-2
    code, out, _ = cli(["generate", str(final), "--prompt", "", "--max-new-tokens", "50",
                        "--temperature", "0"], capsys)
    assert code == 0
    proc = subprocess.run([sys.executable, "-c", GENERATE_WITHOUT_HFTRAIN, str(final)],
                          capture_output=True, text=True, check=True)
    got = json.loads(proc.stdout)
    assert got["class"].lower().startswith(arch) and got["length"] == len("ROMEO:") + 5


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_command_equals_in_training_evaluation(runs, arch, capsys):
    code, out, _ = cli(["eval", str(runs[arch].final_dir), "--data", str(runs["val_file"])],
                       capsys)
    assert code == 0
    loss = float(out.split("loss ")[1].split(" ")[0])
    assert loss == pytest.approx(runs[arch].val["loss"], abs=1e-4)
    code, _, err = cli(["eval", str(runs[arch].final_dir), "--data", str(runs["val_file"]),
                        "--block-size", "17"], capsys)
    assert code != 0 and "max_position_embeddings" in err


@pytest.mark.parametrize("arch", ARCHS)
def test_push_dry_run_card_describes_the_model(runs, arch, tmp_path, capsys):
    from huggingface_hub import ModelCard

    folder = tmp_path / "hub"
    code, _, _ = cli(["push", str(runs[arch].final_dir), "--repo-id", f"me/tiny-{arch}",
                      "--dry-run", "--folder", str(folder)], capsys)
    assert code == 0
    card = ModelCard.load(folder / "README.md")
    assert f"{arch}: 1 layers, 4 heads (2 key-value), width 32, context 16" in card.text
    assert "trust_remote_code" not in card.text
    proc = subprocess.run([sys.executable, "-c", GENERATE_WITHOUT_HFTRAIN, str(folder)],
                          capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout)["length"] == len("ROMEO:") + 5


# --- fine-tuning: init_from, LoRA, packed examples ---------------------------------------------

def finetune(tmp_path: Path, runs, arch: str, **model):
    raw = tiny_recipe_dict(runs["val_file"], tmp_path / "ft", train={"max_steps": 10,
                                                                       "warmup_steps": 0})
    raw["model"] = {"arch": arch, "init_from": str(runs[arch].final_dir), **model}
    return recipe_from_dict(raw)


@pytest.mark.parametrize("arch", ARCHS)
def test_init_from_starts_from_the_export(runs, arch, tmp_path):
    recipe = finetune(tmp_path, runs, arch)
    raw = recipe.to_dict()
    raw["train"].update(lr=1e-12, min_lr=0.0, max_steps=1)
    frozen = train(recipe_from_dict(raw))
    start = runs[arch].model.state_dict()
    for name, value in frozen.model.state_dict().items():
        torch.testing.assert_close(value, start[name], atol=1e-8, rtol=0, msg=name)
    raw["model"]["arch"] = "qwen3" if arch == "llama" else "llama"
    raw["run"]["output_dir"] = str(tmp_path / "other")
    with pytest.raises(HftrainError, match=f"holds a '{arch}' model"):
        train(recipe_from_dict(raw))


def test_card_of_a_fine_tuned_model_shows_no_local_directories(runs, tmp_path):
    """The card is published: local folders and files appear by their last component only
    (two parts leaked user names: /home/alice/corpus.txt -> alice/corpus.txt)."""
    from hftrain.hub import model_card

    result = train(finetune(tmp_path, runs, "llama", lora_r=0))
    text = model_card(result.final_dir, "me/model", None).text
    assert "fine-tuned from the local model `final`" in text
    assert str(tmp_path.parent) not in text and str(runs["val_file"].parent) not in text
    assert runs["val_file"].name in text  # the training data, by file name


def test_init_from_loads_with_the_recipes_attention_kernel(runs, tok):
    """A fine-tuning recipe's `attn_implementation` applies to the model it starts from (it
    used to be dropped, leaving transformers' default)."""
    for attention in ("eager", "sdpa"):
        fields = LlamaFields(init_from=str(runs["llama"].final_dir),
                             attn_implementation=attention)
        assert build_model(fields, tok, 16).config._attn_implementation == attention


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_adapts_q_and_v_projections_and_exports_merged_weights(runs, arch, tmp_path):
    result = train(finetune(tmp_path, runs, arch, lora_r=4, lora_alpha=8))
    from transformers import AutoModelForCausalLM

    export = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert not any("lora" in name for name in export.state_dict())
    ids = torch.randint(4, 60, (2, 16))
    torch.testing.assert_close(export(input_ids=ids).logits, logits_of(result.model, ids),
                               atol=1e-5, rtol=1e-5)
    start = {name: value.cpu() for name, value in runs[arch].model.state_dict().items()}
    changed = {name.split(".")[-2] for name, value in export.state_dict().items()
               if not torch.equal(value, start[name])}
    assert changed == {"q_proj", "v_proj"}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_examples_do_not_attend_to_each_other(tmp_path, shakespeare_text, arch,
                                                     attention):
    """As for GPT-2 (tests/test_sft.py): position ids restarting at 0 give a block-diagonal
    causal mask, so an example packed after others gets the logits it gets alone."""
    from test_sft import RECORDS, sft_streams

    record_text = "".join(r["prompt"] + r["completion"] for r in RECORDS)
    tok = build_tokenizer(TokenizerConfig(kind="char"), [shakespeare_text, record_text], 64)
    batch = next(iter(sft_streams(tmp_path, tok, packing=True, block_size=96).val_batches(1)))
    torch.manual_seed(0)
    fields = MODELS[arch].fields(n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                                 attn_implementation=attention)
    assert_packed_examples_apart(build_decoder(fields, tok, 96).eval(), batch)


# --- resume and torchrun (the builder is shared: llama stands for both) ------------------------

@pytest.mark.slow  # the checkpoint code is the arch's too: GPT-2's kill -9 tests run by default
def test_kill_9_then_resume_reproduces_the_uninterrupted_run(tmp_path, corpus_file):
    from test_checkpoint import losses, run_with_fault, trained_steps, write_recipe

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = write_recipe(tmp_path / "a", corpus_file, "run", model=tiny_model("llama"))
    assert run_with_fault(tmp_path / "whole.txt", whole).returncode == 0
    recipe = write_recipe(tmp_path / "b", corpus_file, "run", model=tiny_model("llama"))
    record = tmp_path / "record.txt"
    assert run_with_fault(record, recipe, kill_at_step=24).returncode == -signal.SIGKILL
    resumed = run_with_fault(record, recipe, extra=["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert trained_steps(record) == trained_steps(tmp_path / "whole.txt")
    expected, got = losses(tmp_path / "a" / "run"), losses(tmp_path / "b" / "run")
    assert got.keys() == expected.keys()
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step


@pytest.mark.slow  # by default test_sharded.py's cache run equals across 2 processes and 1
def test_torchrun_two_processes_train_as_one(tmp_path, corpus_file):
    """With a token cache, 2 processes with batch B/2 train exactly as 1 process with B."""
    if shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists():
        pytest.skip("torchrun not installed")
    from test_distributed import run_two_processes

    from hftrain.cli import main

    data = tiny_recipe_dict(corpus_file, tmp_path / "one", train={"max_steps": 20},
                            eval={"interval": 10, "max_batches": 2})
    data["model"] = tiny_model("llama")
    data["data"]["cache"] = str(tmp_path / "cache")
    recipe = tmp_path / "one.yaml"
    recipe.write_text(json.dumps(data))
    main(["prepare", str(recipe)])
    one = train(recipe_from_dict(copy.deepcopy(data)))
    two = run_two_processes(tmp_path, data)
    a = read_metrics(one.run_dir / "metrics.jsonl")
    b = read_metrics(two / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        name = "loss" if "loss" in x else "val_loss"
        assert y[name] == pytest.approx(x[name], rel=1e-4), x["step"]
    assert json.loads((two / "final" / "config.json").read_text())["model_type"] == "llama"
