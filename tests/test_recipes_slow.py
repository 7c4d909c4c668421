"""The shipped Shakespeare char recipe reaches nanoGPT's validation loss (minutes: `-m slow`)."""

from __future__ import annotations

import pytest
from conftest import CORPUS, REPO
from test_train import assert_export_agrees, independent_check

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
    text = CORPUS.read_text(encoding="utf-8")
    assert_export_agrees(result, independent_check(result.final_dir, text, tmp_path))
