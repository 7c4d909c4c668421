"""The shipped Shakespeare char recipe reaches nanoGPT's validation loss (minutes: `-m slow`)."""

from __future__ import annotations

import pytest
from conftest import REPO

from hftrain.recipe import load_recipe
from hftrain.train import train


@pytest.mark.slow
def test_shakespeare_char_recipe_reaches_nanogpt_loss(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    recipe = load_recipe(REPO / "recipes/shakespeare/gpt2-char.yaml",
                         [f"run.output_dir={tmp_path / 'run'}"])
    result = train(recipe)
    assert result.val["tokens"] == 111_540  # the whole validation split
    assert result.val["loss"] <= 1.90
