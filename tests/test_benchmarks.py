"""Benchmarks cannot rot: a script in `benchmarks/` runs its real code path here at tiny
sizes, and its report is read back (issue 21: train_step.py and recurrent.py had raised
TypeError for weeks, unseen, behind RESULTS rows nobody could re-run). The scripts with their
own smoke test elsewhere: checkpoint.py (test_checkpoint.py), sharded_step.py
(test_sharded.py), vs_nanogpt.py (test_recipes_slow.py, `pytest -m slow`). launch_configs.py is
covered here. Not yet covered:
data_pipeline.py and lm_eval_agreement.py (issue 21)."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys

from conftest import REPO

BENCHMARKS = REPO / "benchmarks"


def run_benchmark(*args: str, timeout: float = 300) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def paired_ratio(report: str) -> float:
    """The ratio line `timing.report` prints, checked against the sides' medians above it."""
    rates = [float(r.replace(",", "")) for r in re.findall(r": +([\d,]+) tokens/s median", report)]
    assert len(rates) == 2 and all(rate > 0 for rate in rates), report
    ratio = float(re.search(r"^ratio \S+: ([\d.]+) \(median", report, re.M).group(1))
    assert 0 < ratio < 100, report
    return ratio


def test_the_train_step_benchmark_runs():
    paired_ratio(run_benchmark(str(BENCHMARKS / "train_step.py"), "--steps", "4",
                               "--warmup", "1", "--batches", "2"))


def test_the_recurrent_benchmark_runs_throughput_and_generation():
    paired_ratio(run_benchmark(str(BENCHMARKS / "recurrent.py"), "throughput", "--steps", "4",
                               "--warmup", "1", "--batches", "2"))
    report = run_benchmark(str(BENCHMARKS / "recurrent.py"), "generation", "--rounds", "1")
    per_token = [float(v) for v in re.findall(r"context +\d+: ([\d.]+) ms per new token", report)]
    assert len(per_token) == 2 and all(v > 0 for v in per_token), report
    assert re.search(r"^ratio 1024/64: [\d.]+$", report, re.M), report


def test_the_launch_configs_benchmark_reads_back_what_the_run_logged(tmp_path):
    """One launch through `accelerate launch` (the single-GPU config; on this CPU machine it
    trains on the CPU): the table's figures are the run's own metrics.jsonl medians."""
    report = run_benchmark(
        str(BENCHMARKS / "launch_configs.py"), "recipes/shakespeare/gpt2-char.yaml",
        "--launch", "single_gpu", "--skip", "1", "--work-dir", str(tmp_path),
        "--json", str(tmp_path / "results.json"), "--set", "train.max_steps=6",
        "train.log_interval=2", "eval.interval=6", "eval.max_batches=2", "sample.max_new_tokens=4")
    [result] = json.loads((tmp_path / "results.json").read_text())
    logged = [json.loads(line) for line in (tmp_path / "single_gpu" / "metrics.jsonl").open()]
    windows = [r["tokens_per_s"] for r in logged if "tokens_per_s" in r]
    assert result["exit"] == 0 and result["steps"] == 6 and len(windows) == 3
    assert result["tokens_per_s"] == statistics.median(windows[1:]) > 0
    assert result["val_bpb"] == [r for r in logged if "val_bpb" in r][-1]["val_bpb"]
    assert re.search(r"^\| single_gpu \| 0 \| 6 \| [\d,]+ \| - \|", report, re.M), report
