"""Recipes parse, validate, and reject mistakes with the key and the file named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hftrain.errors import RecipeError
from hftrain.models import GPT2Fields
from hftrain.recipe import dump_recipe, load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 2


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_recipe_parses(path: Path):
    recipe = load_recipe(path)
    for data in recipe.data.by_source():  # (a mixture: each source)
        assert data.train_files or data.dataset
        for pattern in data.train_files:
            assert (REPO / pattern).exists(), f"{path} names a missing file {pattern}"


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_overrides_are_typed_and_nested(tmp_path: Path):
    path = write(tmp_path, {"train": {"max_steps": 10}})
    recipe = load_recipe(path, ["train.max_steps=100", "train.lr=3e-4", "run.output_dir=runs/x",
                                "data.train_files=[a.txt, b.txt]", "train.mixed_precision=null"])
    assert recipe.train.max_steps == 100
    assert recipe.train.lr == pytest.approx(3e-4)
    assert recipe.run.output_dir == "runs/x"
    assert recipe.data.train_files == ["a.txt", "b.txt"]
    assert recipe.train.mixed_precision is None
    assert isinstance(recipe.model, GPT2Fields)


def test_unknown_key_names_key_and_file(tmp_path: Path):
    path = write(tmp_path, {"train": {"max_step": 10}})
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    message = str(exc.value)
    assert "train.max_step" in message and str(path) in message
    assert "did you mean 'train.max_steps'" in message


def test_unknown_section_and_unknown_override(tmp_path: Path):
    path = write(tmp_path, {})
    with pytest.raises(RecipeError, match="unknown key 'trian'"):
        load_recipe(path, ["trian.max_steps=3"])


def test_wrong_type_names_key_and_file(tmp_path: Path):
    path = write(tmp_path, {"train": {"max_steps": "many"}})
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    assert "train.max_steps expects int" in str(exc.value) and str(path) in str(exc.value)


def test_invalid_values_and_choices(tmp_path: Path):
    with pytest.raises(RecipeError, match="n_embd .* divisible by n_head"):
        load_recipe(write(tmp_path, {"model": {"n_embd": 30, "n_head": 4}}))
    with pytest.raises(RecipeError, match="tokenizer.kind must be one of"):
        load_recipe(write(tmp_path, {"tokenizer": {"kind": "sentencepiece"}}))
    with pytest.raises(RecipeError, match="model.arch 'mamba'"):
        load_recipe(write(tmp_path, {"model": {"arch": "mamba"}}))
    with pytest.raises(RecipeError, match="bool"):
        load_recipe(write(tmp_path, {"run": {"overwrite": "yes please"}}))


def test_missing_and_malformed_recipe_files(tmp_path: Path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_resolved_recipe_round_trips(tmp_path: Path):
    recipe = load_recipe(write(tmp_path, {"train": {"max_steps": 7}}), ["model.n_layer=2"])
    out = tmp_path / "resolved.yaml"
    dump_recipe(recipe, out)
    again = load_recipe(out)
    assert again == recipe


@pytest.mark.parametrize(("override", "expected"), [
    ("model.arch=[x]", "model.arch ['x'] is not one of"),
    ("run.trackers=[nonexistent]", "'nonexistent' is not one of Accelerate's trackers"),
    ("data.train_files={a: 1}", "data.train_files expects a list"),
    ("train.lr=1e400", "train.lr must be a finite number"),
])
def test_bad_overrides_are_one_line(tmp_path: Path, override: str, expected: str):
    """Among 40 override probes (issue 20, S15d), these raised TypeError or Accelerate's
    ValueError at the start of training."""
    path = write(tmp_path, {"train": {"max_steps": 10}})
    with pytest.raises(RecipeError) as refused:
        load_recipe(path, [override])
    assert expected in str(refused.value) and "\n" not in str(refused.value)


def test_a_recipe_changed_in_code_is_checked_across_sections_before_anything_is_written(
        tmp_path: Path):
    """`train()` runs the cross-section rules again: a recipe loaded, then changed in code
    (as a notebook would), fails in one line naming the key, with nothing written."""
    from conftest import tiny_recipe_dict

    from hftrain.recipe import recipe_from_dict
    from hftrain.train import train

    corpus = tmp_path / "c.txt"
    corpus.write_text("to be or not to be\n" * 50, encoding="utf-8")
    recipe = recipe_from_dict(tiny_recipe_dict(corpus, tmp_path / "run"))
    recipe.train.stateful = True  # GPT-2 has no recurrent state to carry
    with pytest.raises(RecipeError, match="train.stateful needs a recurrent model, not 'gpt2'"):
        train(recipe)
    assert not (tmp_path / "run").exists()
