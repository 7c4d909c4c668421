"""The tokenizer a run uses: reused (`tokenizer.name_or_path`, `model.init_from`), found in the
run folder (from `hftrain tokenizer`, or the run being resumed) and checked against the record
of how it was built, or built now from the training stream; saved with that record."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hftrain.atomic import atomic_directory
from hftrain.checks import check_local_folder
from hftrain.data import describe_source, texts
from hftrain.data.sources import resolve_files
from hftrain.data_check import content_sample
from hftrain.errors import HftrainError, RecipeError
from hftrain.recipe import Recipe
from hftrain.resume import changed_keys
from hftrain.run_folder import check_replaceable, record_written
from hftrain.tokenizer import build_tokenizer, load_tokenizer

TOKENIZER_RECORD = "hftrain_tokenizer.json"
"""Written next to a tokenizer hftrain builds into a run folder: the recipe settings it was
built with, checked when a later command reuses it."""


def prepare_tokenizer(recipe: Recipe) -> tuple[Any, bool]:
    """The recipe's tokenizer and whether it was built now (and so still needs saving).

    Order of preference: `tokenizer.name_or_path`; the tokenizer of `model.init_from`; a
    tokenizer already in the run folder (from `hftrain tokenizer`, or the run being resumed),
    which must have been built with the recipe's tokenizer settings; otherwise one built from
    the training stream.
    """
    if recipe.tokenizer.name_or_path or recipe.model.init_from:
        name = recipe.tokenizer.name_or_path or recipe.model.init_from
        check_local_folder(name, "tokenizer.name_or_path" if recipe.tokenizer.name_or_path
                           else "model.init_from")
        return load_tokenizer(name, trust_remote_code=recipe.model.trust_remote_code), False
    saved = Path(recipe.run.output_dir) / "tokenizer"
    if (saved / "tokenizer.json").is_file() and not recipe.run.overwrite:
        check_saved_tokenizer(saved, recipe)
        return load_tokenizer(str(saved)), False
    corpus = texts(recipe.data, "train")
    source = describe_source(recipe.data, "train")
    return build_tokenizer(recipe.tokenizer, corpus, recipe.data.block_size, source), True


def tokenizer_record(recipe: Recipe) -> dict[str, Any]:
    """What a built tokenizer depends on: the tokenizer section and the text it learned from."""
    origins = [[data.dataset, data.dataset_config, data.train_split] if data.dataset
               else [os.path.abspath(f) for f in data.train_files]
               for data in recipe.data.by_source()]
    origin = origins if recipe.data.sources else origins[0]  # a mixture: each source's
    return {**{f"tokenizer.{k}": v for k, v in recipe.to_dict()["tokenizer"].items()},
            "data.train_files": origin}


SAMPLES = "data.train_samples"
"""In the record: the training files by content (`content_sample`), so that a tokenizer
learned from files since moved elsewhere with the same bytes is still the recipe's."""


def _train_samples(recipe: Recipe) -> list[str] | None:
    sources = recipe.data.by_source()
    if any(data.dataset for data in sources):
        return None
    try:
        files = [path for data in sources
                 for path in resolve_files(data.train_files, "data.train_files")]
        return [content_sample(path) for path in files]
    except (OSError, HftrainError):
        return None


def check_saved_tokenizer(folder: Path, recipe: Recipe) -> None:
    """Refuse a tokenizer in the run folder that the recipe did not build: other tokenizer
    settings (`hftrain tokenizer` with kind char, then `train` with kind byte_bpe) or other
    training text, or one without the record hftrain writes with every tokenizer it builds."""
    fix = "Use another run.output_dir, or run.overwrite=true to rebuild it"
    try:
        saved = json.loads((folder / TOKENIZER_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise RecipeError(f"{folder} has no readable {TOKENIZER_RECORD}, so it cannot be told "
                          f"whether it fits the recipe. {fix}") from None
    current = tokenizer_record(recipe)
    if saved.get(SAMPLES) and saved.get(SAMPLES) == _train_samples(recipe):
        current["data.train_files"] = saved.get("data.train_files")  # moved, same bytes
    changed = changed_keys({k: v for k, v in saved.items() if k != SAMPLES}, current)
    if changed:
        raise RecipeError(f"{folder} was built with other settings than the recipe's: "
                          f"{'; '.join(changed)}. {fix}")


def save_run_tokenizer(tokenizer: Any, recipe: Recipe, folder: Path) -> None:
    """The tokenizer and the record of how it was built, written together or not at all."""
    check_replaceable(folder.parent, folder.name)  # replaced whole: none of the user's files
    with atomic_directory(folder) as tmp:
        tokenizer.save_pretrained(tmp)
        record = {**tokenizer_record(recipe), SAMPLES: _train_samples(recipe)}
        (tmp / TOKENIZER_RECORD).write_text(json.dumps(record, indent=2))
    record_written(folder.parent, folder.name)  # run.overwrite may remove exactly these
