"""Benchmark scores during training (issue 23, `eval.tasks`): lm-eval tasks scored on the
live model at every evaluation, logged and plotted, equal to `hftrain eval --tasks` on the
export of the same step; bad task settings refused in one line before anything is written.
Skipped where lm-eval is not installed (`pip install -e ".[eval]"`)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, cli, run_or_dump, tiny_recipe_dict

from hftrain.harness import write_rolling_task
from hftrain.tracking import read_metrics

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                reason="lm-eval is not installed (pip install -e '.[eval]')")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, shakespeare_text) -> Path:
    """A local rolling log-likelihood task over held-out Shakespeare (two documents)."""
    folder = tmp_path_factory.mktemp("tasks")
    write_rolling_task(folder, "heldout_roll", [shakespeare_text[-3000:-1500],
                                                shakespeare_text[-1500:]])
    return folder


def recipe_file(tmp_path: Path, corpus: Path, name: str = "run", **eval_settings) -> Path:
    recipe = tiny_recipe_dict(corpus, tmp_path / name, train={"max_steps": 20},
                              eval={"interval": 10, "max_batches": 2, **eval_settings},
                              sample={"max_new_tokens": 0})
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(recipe))
    return path


def test_tasks_scored_during_training_equal_hftrain_eval_on_the_export(tmp_path, corpus_file,
                                                                        tasks, capsys):
    recipe = recipe_file(tmp_path, corpus_file, tasks=["heldout_roll"],
                         task_include_path=str(tasks))
    code, out, err = cli(["train", str(recipe)], capsys)
    assert code == 0, err
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in records] == [10, 20]  # every evaluation, the final one too
    first, final = (r["task/heldout_roll/bits_per_byte"] for r in records)
    assert final < first  # the model learned between them
    assert all(r["task_seconds"] > 0 for r in records)
    assert f"heldout_roll bits_per_byte {final:.4f}" in out
    code, out, err = cli(["eval", str(tmp_path / "run" / "final"), "--tasks", "heldout_roll",
                          "--include-path", str(tasks), "--json"], capsys)
    assert code == 0, err
    exported = json.loads(out.strip().splitlines()[-1])["tasks"]["heldout_roll"]
    for metric in ("bits_per_byte", "byte_perplexity", "word_perplexity"):
        assert records[-1][f"task/heldout_roll/{metric}"] == pytest.approx(exported[metric],
                                                                          rel=1e-6)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0


@pytest.mark.parametrize("settings, message", [
    ({"tasks": ["no_such_task_xyz"], "task_include_path": "TASKS"},
     "eval.tasks: unknown lm-eval task 'no_such_task_xyz'"),
    ({"tasks": ["heldout_roll"], "task_include_path": "MISSING"},
     "eval.tasks: eval.task_include_path: no such folder"),
    ({"task_limit": 10}, "eval.task_limit and task_include_path apply to lm-eval tasks"),
    ({"tasks": ["heldout_roll"], "task_limit": 0}, "eval.task_limit must be > 0"),
    ({"tasks": [" "]}, "eval.tasks names an empty task"),
])
def test_bad_task_settings_are_one_line_before_anything_is_written(tmp_path, corpus_file, tasks,
                                                                   capsys, settings, message):
    paths = {"TASKS": str(tasks), "MISSING": str(tmp_path / "missing")}
    settings = {k: paths.get(v, v) if isinstance(v, str) else v for k, v in settings.items()}
    code, out, err = cli(["train", str(recipe_file(tmp_path, corpus_file, **settings))], capsys)
    assert code == 2
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_a_local_task_that_runs_python_is_refused_in_training(tmp_path, corpus_file, tasks,
                                                              capsys):
    folder = tmp_path / "tasks"
    folder.mkdir()
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                    "def fn(docs):\n    return docs\n")
    task = (tasks / "heldout_roll.yaml").read_text() + "process_docs: !function evil.fn\n"
    (folder / "heldout_roll.yaml").write_text(task)
    recipe = recipe_file(tmp_path, corpus_file, tasks=["heldout_roll"],
                         task_include_path=str(folder))
    code, out, err = cli(["train", str(recipe)], capsys)
    assert code == 2 and "runs Python (!function evil.fn)" in err, err
    assert "hftrain eval --tasks --trust-remote-code" in err
    assert not marker.exists() and not (tmp_path / "run").exists()


@pytest.mark.slow  # two processes and lm-eval: half a minute
def test_two_processes_score_tasks_on_the_main_process_while_the_other_waits(tmp_path,
                                                                             corpus_file, tasks):
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    recipe = recipe_file(tmp_path, corpus_file, tasks=["heldout_roll"],
                         task_include_path=str(tasks))
    done = run_or_dump([torchrun, "--nproc_per_node", "2", "-m", "hftrain", "train",
                        str(recipe)], 600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in records] == [10, 20]
    exported = subprocess.run(
        [sys.executable, "-m", "hftrain", "eval", str(tmp_path / "run" / "final"), "--tasks",
         "heldout_roll", "--include-path", str(tasks), "--json"],
        capture_output=True, text=True, cwd=REPO, check=True).stdout
    scores = json.loads(exported.strip().splitlines()[-1])["tasks"]["heldout_roll"]
    assert records[-1]["task/heldout_roll/bits_per_byte"] == pytest.approx(
        scores["bits_per_byte"], rel=1e-6)
