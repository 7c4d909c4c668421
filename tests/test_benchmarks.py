"""Benchmarks cannot rot: a script in `benchmarks/` runs its real code path here at tiny
sizes, and its report is read back (issue 21: train_step.py and recurrent.py had raised
TypeError for weeks, unseen, behind RESULTS rows nobody could re-run). The scripts with their
own smoke test elsewhere: checkpoint.py (test_checkpoint.py), sharded_step.py
(test_sharded.py), vs_nanogpt.py (test_recipes_slow.py, `pytest -m slow`). Not yet covered:
data_pipeline.py and lm_eval_agreement.py (issue 21)."""

from __future__ import annotations

import os
import re
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
