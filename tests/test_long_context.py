"""Long context (issue 23): a Llama/Qwen3 model's positions are no longer tied to
data.block_size (`model.max_position_embeddings`), and rotary positions stretch with
transformers' own types (`model.rope_scaling`: linear, yarn, llama3), checked in one line. A
model learned at 16 tokens, fine-tuned with YaRN at 64, exports a plain transformers model
that `hftrain eval` scores at 64 tokens and `hftrain generate` runs past its first length."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli, tiny_recipe_dict
from transformers import AutoModelForCausalLM

from hftrain.recipe import recipe_from_dict
from hftrain.train import train

TINY_LLAMA = {"arch": "llama", "n_layer": 1, "n_head": 4, "n_kv_head": 2, "n_embd": 32}


def recipe(corpus, out, block: int, model: dict, steps: int = 20):
    data = tiny_recipe_dict(corpus, out, model=model, data={"block_size": block},
                            train={"max_steps": steps, "batch_size": 4},
                            eval={"interval": 100, "max_batches": 2},
                            sample={"max_new_tokens": 0})
    return recipe_from_dict(data)


@pytest.fixture(scope="module")
def short_export(tmp_path_factory, shakespeare_text):
    root = tmp_path_factory.mktemp("long")
    corpus = root / "corpus.txt"
    corpus.write_text(shakespeare_text[:30_000], encoding="utf-8")
    result = train(recipe(corpus, root / "short", 16, TINY_LLAMA, steps=40))
    return corpus, result.final_dir


@pytest.mark.parametrize("scaling", [{"type": "yarn", "factor": 4},
                                     {"type": "linear", "factor": 4},
                                     {"type": "llama3", "factor": 4}])
def test_a_short_model_stretched_with_rope_scaling_exports_plain_transformers(
        short_export, tmp_path, capsys, scaling):
    corpus, short = short_export
    long = train(recipe(corpus, tmp_path / "long", 64,
                        {"arch": "llama", "init_from": str(short), "max_position_embeddings": 64,
                         "rope_scaling": scaling}))
    config = json.loads((long.final_dir / "config.json").read_text())
    assert config["max_position_embeddings"] == 64
    rope = config["rope_parameters"]
    assert rope["rope_type"] == scaling["type"] and rope["factor"] == 4.0
    assert rope["rope_theta"] == 10000.0  # the loaded model's own base, kept
    if scaling["type"] != "linear":
        assert rope["original_max_position_embeddings"] == 16  # the length it learned
    plain = AutoModelForCausalLM.from_pretrained(long.final_dir).eval()
    ids = torch.randint(4, 40, (1, 64))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, long.model(ids).logits)

    val = str(corpus)
    code, _, err = cli(["eval", str(short), "--data", val, "--block-size", "64"], capsys)
    assert code == 2 and "more than the 16 positions" in err
    code, out, err = cli(["eval", str(long.final_dir), "--data", val, "--block-size", "64"],
                         capsys)
    assert code == 0 and "(block 64, stride 64)" in out, err
    code, out, err = cli(["generate", str(long.final_dir), "--max-new-tokens", "80",
                          "--temperature", "0"], capsys)
    assert code == 0 and len(out.rstrip("\n")) > 16, err  # past its first length (chars)


def test_a_fresh_model_may_attend_past_its_training_block(tmp_path, corpus_file, capsys):
    result = train(recipe(corpus_file, tmp_path / "run", 16,
                          {**TINY_LLAMA, "max_position_embeddings": 64}, steps=5))
    assert json.loads((result.final_dir / "config.json").read_text())[
        "max_position_embeddings"] == 64
    code, out, err = cli(["eval", str(result.final_dir), "--data", str(corpus_file),
                          "--block-size", "64"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("override, message", [
    ("model.rope_scaling.type=dynamic", "model.rope_scaling.type must be one of"),
    ("model.rope_scaling.factor=0.5", "model.rope_scaling.factor must be >= 1"),
    ("model.rope_scaling.high_freq_factor=0.5", "high_freq_factor (0.5) must be greater"),
    ("model.rope_scaling.sharpness=2", "unknown key 'model.rope_scaling.sharpness'"),
    ("model.max_position_embeddings=8", "model.max_position_embeddings (8) is less than "
                                        "data.block_size (16)"),
])
def test_bad_long_context_settings_are_one_line(tmp_path, corpus_file, capsys, override,
                                                message):
    data = tiny_recipe_dict(corpus_file, tmp_path / "run", model=dict(TINY_LLAMA),
                            data={"block_size": 16})
    data["model"]["rope_scaling"] = {"type": "yarn", "factor": 4}
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(data))
    code, _, err = cli(["train", str(path), override], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "run").exists()


def test_gpt2_has_no_rotary_positions_to_scale(tmp_path, corpus_file, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(tiny_recipe_dict(corpus_file, tmp_path / "run")))
    code, _, err = cli(["train", str(path), "model.rope_scaling.type=yarn"], capsys)
    assert code == 2 and "unknown key 'model.rope_scaling'" in err


def test_the_long_context_benchmark_scores_every_row(short_export, tmp_path):
    """benchmarks/long_context.py's smoke run: four rows, the base scored only within its
    positions, every other cell a loss."""
    import re
    import subprocess
    import sys

    from conftest import REPO

    corpus, short = short_export
    long = train(recipe(corpus, tmp_path / "long", 32,
                        {"arch": "llama", "init_from": str(short), "max_position_embeddings": 32,
                         "rope_scaling": {"type": "yarn", "factor": 2}}, steps=3))
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "long_context.py"),
                           str(short), str(long.final_dir), "--lengths", "16", "32",
                           "--data", str(corpus)], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line[:40].strip(): line[40:].split() for line in done.stdout.splitlines()[2:]}
    assert list(rows) == ["base", "base, plain positions past its length",
                          "base + scaling, untrained", "fine-tuned"], done.stdout
    assert rows["base"][1] == "-" and re.fullmatch(r"\d+\.\d{4}", rows["base"][0])
    assert all(re.fullmatch(r"\d+\.\d{4}", cell) for name, cells in rows.items()
               for cell in cells if name != "base"), done.stdout
