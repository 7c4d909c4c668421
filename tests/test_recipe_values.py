"""Out-of-range, non-finite and malformed recipe values are refused before anything is written:
one `hftrain: error:` line naming the key (or override, or file), exit status 2, no run folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import REPO, tiny_recipe_dict

from hftrain.cli import main
from hftrain.errors import RecipeError
from hftrain.recipe import TrainConfig, dump_recipe, load_recipe

LSTM = {"arch": "lstm", "embedding_size": 16, "hidden_size": 16, "num_layers": 1}

# (override, what the error line must name)
BAD_VALUES = [
    ("train.lr=.inf", "train.lr"),
    ("train.lr=-.inf", "train.lr"),
    ("train.lr=nan", "train.lr"),  # YAML reads the string 'nan'; float() would accept it
    ("train.lr=inf", "train.lr"),
    ("train.lr=1e999", "train.lr"),
    ("train.lr=1" + "0" * 400, "train.lr"),  # an int too large for a float
    ("train.lr=0", "train.lr"),
    ("train.min_lr=.nan", "train.min_lr"),
    ("train.min_lr=-1e-4", "train.min_lr"),
    ("train.min_lr=1", "train.min_lr"),  # above lr under cosine_with_min_lr
    ("train.grad_clip=.nan", "train.grad_clip"),
    ("train.grad_clip=-1", "train.grad_clip"),
    ("train.weight_decay=-5", "train.weight_decay"),
    ("train.beta1=2", "train.beta1"),
    ("train.beta2=1", "train.beta2"),
    ("train.momentum=-0.1", "train.momentum"),
    ("train.warmup_steps=-1", "train.warmup_steps"),
    ("train.peak_tflops=.inf", "train.peak_tflops"),
    ("train.peak_tflops=0", "train.peak_tflops"),
    ("run.seed=-1", "run.seed"),
    ("run.seed=4294967296", "run.seed"),
    ("eval.max_batches=0", "eval.max_batches"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("checkpoint.keep=0", "checkpoint.keep"),
    ("checkpoint.interval=-1", "checkpoint.interval"),
    ("sample.max_new_tokens=-1", "sample.max_new_tokens"),
    ("sample.temperature=-0.5", "sample.temperature"),
    ("sample.temperature=.nan", "sample.temperature"),
    ("sample.top_k=0", "sample.top_k"),
    ("tokenizer.vocab_size=0", "tokenizer.vocab_size"),
    ("tokenizer.min_frequency=0", "tokenizer.min_frequency"),
    ("data.val_fraction=.nan", "data.val_fraction"),
    ("data.shuffle_tokens=-1", "data.shuffle_tokens"),
    ("data.num_workers=-1", "data.num_workers"),
    ("model.n_layer=0", "model.n_layer"),
    ("model.n_head=3", "model.n_embd"),  # 32 is not divisible by 3
    ("model.dropout=1", "model.dropout"),
    ("model.lora_r=-1", "model.lora_r"),
    ("model.lora_alpha=0", "model.lora_alpha"),
    ("model.lora_dropout=1.5", "model.lora_dropout"),
    ("hub.repo_id=owner/name/extra", "hub.repo_id"),
    ("hub.repo_id=has space", "hub.repo_id"),
    ("hub.push_to_hub=true", "hub.repo_id"),
    ("model.init_range=-0.1", "model.init_range"),  # with the LSTM model section
    ("model.output_dropout=.inf", "model.output_dropout"),  # with the LSTM model section
]

MALFORMED_OVERRIDES = ["train.lr=[", "train.lr={a: 1", "train..lr=1", ".lr=1", "train.=1"]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def write_recipe(tmp_path: Path, corpus: Path, model: dict | None = None) -> tuple[Path, Path]:
    out = tmp_path / "run"
    data = tiny_recipe_dict(corpus, out)
    if model:
        data["model"] = model
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(data))  # JSON is valid YAML
    return path, out


def assert_one_error_line(code: int, lines: list[str], *names: str) -> None:
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("hftrain: error:"), lines
    assert "Traceback" not in lines[0]
    for name in names:
        assert name in lines[0], lines[0]


@pytest.mark.parametrize(("override", "culprit"), BAD_VALUES, ids=[o[:40] for o, _ in BAD_VALUES])
def test_bad_value_gives_one_line_and_writes_nothing(override, culprit, tmp_path, corpus_file,
                                                     capsys):
    lstm = "init_range" in override or "output_dropout" in override
    path, out = write_recipe(tmp_path, corpus_file, model=LSTM if lstm else None)
    code, lines = run_cli(["train", str(path), override], capsys)
    assert_one_error_line(code, lines, culprit, str(path))
    assert not out.exists()


@pytest.mark.parametrize("override", MALFORMED_OVERRIDES)
def test_malformed_override_gives_one_line_naming_it(override, tmp_path, corpus_file, capsys):
    path, out = write_recipe(tmp_path, corpus_file)
    code, lines = run_cli(["train", str(path), override], capsys)
    assert_one_error_line(code, lines, f"override '{override}'")
    assert not out.exists()


def test_bad_value_in_the_file_names_key_and_file(tmp_path, corpus_file, capsys):
    path, out = write_recipe(tmp_path, corpus_file)
    path.write_text(path.read_text().replace('"lr": 0.003', '"lr": .nan'))
    code, lines = run_cli(["train", str(path)], capsys)
    assert_one_error_line(code, lines, "train.lr", str(path), "finite")
    assert not out.exists()


def test_non_utf8_recipe_gives_one_line_naming_the_file(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run:\n  output_dir: runs/caf\xe9\n".encode("latin-1"))
    code, lines = run_cli(["train", str(path)], capsys)
    assert_one_error_line(code, lines, str(path), "UTF-8")
    assert not (tmp_path / "runs").exists()


def test_recipe_path_that_is_a_directory_gives_one_line(tmp_path, capsys):
    code, lines = run_cli(["train", str(tmp_path)], capsys)
    assert_one_error_line(code, lines, str(tmp_path), "directory")


@pytest.mark.parametrize("spelling", ["no", "off"])
def test_mixed_precision_no_is_the_string_no(spelling, tmp_path):
    """YAML 1.1 reads an unquoted `no` (or `off`) as False; the choice 'no' is meant."""
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  max_steps: 10\n")
    recipe = load_recipe(path, [f"train.mixed_precision={spelling}"])
    assert recipe.train.mixed_precision == "no"
    path.write_text(f"train:\n  mixed_precision: {spelling}\n")
    recipe = load_recipe(path)
    assert recipe.train.mixed_precision == "no"
    resolved = tmp_path / "resolved.yaml"
    dump_recipe(recipe, resolved)
    assert load_recipe(resolved) == recipe


def test_a_bool_that_is_no_choice_is_still_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  mixed_precision: yes\n")
    with pytest.raises(RecipeError, match=r"train.mixed_precision must be one of .* got True"):
        load_recipe(path)


def test_allowed_edge_values(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("sample:\n")  # an empty section still takes overrides
    recipe = load_recipe(path, [
        "train.warmup_steps=500", "train.max_steps=10",  # a short trial of a long recipe
        "train.min_lr=0", "train.grad_clip=0", "train.weight_decay=0", "train.beta1=0",
        "run.seed=0", "sample.max_new_tokens=0", "sample.temperature=0", "sample.top_k=1",
        "eval.max_batches=1", "hub.repo_id=name", "train.lr=3e-4",
    ])
    assert recipe.sample.max_new_tokens == 0 and recipe.train.lr == pytest.approx(3e-4)
    assert load_recipe(path, ["run.seed=4294967295"]).run.seed == 2**32 - 1
    assert load_recipe(path, ["hub.repo_id=owner/my-model.v2"]).hub.repo_id == "owner/my-model.v2"
    # min_lr only bounds the cosine_with_min_lr schedule; other schedules ignore it
    recipe = load_recipe(path, ["train.scheduler=linear", "train.lr=1e-5", "train.min_lr=1e-4"])
    assert recipe.train.min_lr > recipe.train.lr


def test_sections_built_in_code_refuse_nan_too():
    with pytest.raises(ValueError, match="lr must be > 0"):
        TrainConfig(lr=math.nan)
    with pytest.raises(ValueError, match="beta2 must be in"):
        TrainConfig(beta2=math.nan)


def test_the_installed_dependencies_are_within_the_ranges_pyproject_declares():
    """The lower bounds in pyproject.toml are the releases the suite has passed on: a test run
    on an older release than declared would be a claim nobody tested."""
    from importlib.metadata import version

    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for line in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
        requirement = Requirement(line)
        assert requirement.specifier.contains(version(requirement.name), prereleases=True), \
            f"{requirement.name} {version(requirement.name)} is outside {line}"
