"""A token budget instead of a step count (issue 23): `train.max_tokens` derives `max_steps`
for the launch (global batch x block positions per step), the schedule follows it, and a
finished run goes on when the budget is raised on `--resume`, as with `max_steps`."""

from __future__ import annotations

import json

import pytest
from conftest import cli, tiny_recipe_dict

from hftrain.recipe import TrainConfig
from hftrain.tracking import read_metrics


def write(tmp_path, corpus, name: str, **train) -> str:
    data = tiny_recipe_dict(corpus, tmp_path / name,
                            train={"log_interval": 2, "warmup_steps": 2, **train},
                            eval={"interval": 100, "max_batches": 2},
                            sample={"max_new_tokens": 0})
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(data))
    return str(path)


def training_records(run_dir) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["lr"]) for r in read_metrics(run_dir / "metrics.jsonl")
            if "loss" in r]


def test_the_steps_are_the_fewest_that_reach_the_budget_on_the_processes_launched():
    cfg = TrainConfig(batch_size=4, grad_accum_steps=2, max_tokens=1000)
    assert cfg.steps_for_tokens(processes=1, block_size=16) == 8  # 128 positions a step
    assert cfg.steps_for_tokens(processes=2, block_size=16) == 4  # 256: 1,024 >= 1,000
    assert TrainConfig(max_tokens=256, batch_size=4).steps_for_tokens(2, 16) == 2  # exactly


def test_a_token_budget_trains_as_the_run_of_its_steps_would(tmp_path, corpus_file, capsys):
    """1,000 positions at 8 blocks x 16: 8 steps, with the schedule of an 8-step run."""
    code, out, err = cli(["train", write(tmp_path, corpus_file, "budget", max_tokens=1000)],
                         capsys)
    assert code == 0, err
    assert "train.max_tokens 1,000: 8 steps of 128 token positions" in out
    assert cli(["train", write(tmp_path, corpus_file, "steps", max_steps=8)], capsys)[0] == 0
    budget, steps = training_records(tmp_path / "budget"), training_records(tmp_path / "steps")
    assert [s for s, _, _ in budget] == [s for s, _, _ in steps] == [2, 4, 6, 8]
    for (_, loss, lr), (_, loss_steps, lr_steps) in zip(budget, steps, strict=True):
        assert (loss, lr) == pytest.approx((loss_steps, lr_steps), rel=1e-6)


def test_raising_the_budget_on_resume_continues_the_finished_run(tmp_path, corpus_file, capsys):
    recipe = write(tmp_path, corpus_file, "run", max_tokens=1000)
    assert cli(["train", recipe], capsys)[0] == 0
    code, out, err = cli(["train", recipe, "train.max_tokens=2000", "--resume"], capsys)
    assert code == 0, err
    assert "resumed from" in out and "at step 8" in out
    assert training_records(tmp_path / "run")[-1][0] == 16


@pytest.mark.parametrize("value", ["0", "-5", "lots"])
def test_a_bad_budget_is_one_line_naming_the_key(tmp_path, corpus_file, capsys, value):
    code, _, err = cli(["train", write(tmp_path, corpus_file, "run"),
                        f"train.max_tokens={value}"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "train.max_tokens" in lines[0], err
    assert not (tmp_path / "run").exists()
