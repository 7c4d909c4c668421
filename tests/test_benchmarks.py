"""Benchmarks cannot rot: a script in `benchmarks/` runs its real code path here at tiny
sizes, and its report is read back (issue 21: train_step.py and recurrent.py had raised
TypeError for weeks, unseen, behind RESULTS rows nobody could re-run). The scripts with their
own smoke test elsewhere: checkpoint.py (test_checkpoint.py), sharded_step.py
(test_sharded.py). launch_configs.py, vs_nanogpt.py (both sides shortened to a few steps),
data_pipeline.py (throughput and the token cache; resume and peak RSS through the CLI),
lm_eval_agreement.py, activation_checkpointing.py, mixture.py and tasks_in_training.py are
covered here."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys

import pytest
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


def test_the_vs_nanogpt_benchmark_times_both_whole_jobs_and_reports_the_ratio():
    """One round of both jobs, each a few steps (the reference's max_iters and hftrain's
    max_steps shortened): the table has both rows, their times and hftrain's loss."""
    report = run_benchmark(str(BENCHMARKS / "vs_nanogpt.py"), "--rounds", "1",
                           "--reference-iters", "4", "train.max_steps=4", "eval.interval=100",
                           "eval.max_batches=2", "sample.max_new_tokens=0")
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(
        r"^\| (hftrain|nanoGPT-style reference) \| ([\d.]+) s \([\d., ]+\) \| ([\d.]+)x \| "
        r"([\d.]+)x \| ([\d.]+|-) \|$", report, re.M)}
    assert set(rows) == {"hftrain", "nanoGPT-style reference"}, report
    assert float(rows["hftrain"][0]) > 0 and float(rows["nanoGPT-style reference"][1]) == 1.0
    assert float(rows["hftrain"][3]) > 0 and rows["nanoGPT-style reference"][3] == "-", report


def test_the_activation_checkpointing_benchmark_reports_both_sides_and_their_ratios():
    report = run_benchmark(str(BENCHMARKS / "activation_checkpointing.py"), "--n-layer", "2",
                           "--n-embd", "32", "--n-head", "2", "--block", "64", "--vocab", "100",
                           "--steps", "1", "--rounds", "1")
    sides = re.findall(r"^(plain|checkpointed) *: +([\d.]+) s/step median, peak memory +"
                       r"([\d.]+) GB$", report, re.M)
    assert sorted(name for name, _, _ in sides) == ["checkpointed", "plain"], report
    assert all(float(step) > 0 and float(peak) > 0.1 for _, step, peak in sides), report
    ratios = re.search(r"^ratio checkpointed/plain: peak memory ([\d.]+), step time ([\d.]+)$",
                       report, re.M)
    assert ratios and all(0 < float(r) < 10 for r in ratios.groups()), report


def test_the_launch_configs_benchmark_reads_back_what_the_run_logged(tmp_path):
    """One launch through `accelerate launch` (the single-GPU config; on this CPU machine it
    trains on the CPU, in fp32: the config's bf16 is emulated, ~10x slower, on AVX2-only
    CPUs): the table's figures are the run's own metrics.jsonl medians."""
    report = run_benchmark(
        str(BENCHMARKS / "launch_configs.py"), "recipes/shakespeare/gpt2-char.yaml",
        "--launch", "single_gpu", "--skip", "1", "--work-dir", str(tmp_path),
        "--json", str(tmp_path / "results.json"), "--set", "train.max_steps=6",
        "train.mixed_precision=no", "train.log_interval=2", "eval.interval=6",
        "eval.max_batches=2", "sample.max_new_tokens=4")
    [result] = json.loads((tmp_path / "results.json").read_text())
    logged = [json.loads(line) for line in (tmp_path / "single_gpu" / "metrics.jsonl").open()]
    windows = [r["tokens_per_s"] for r in logged if "tokens_per_s" in r]
    assert result["exit"] == 0 and result["steps"] == 6 and len(windows) == 3
    assert result["tokens_per_s"] == statistics.median(windows[1:]) > 0
    assert result["val_bpb"] == [r for r in logged if "val_bpb" in r][-1]["val_bpb"]
    assert re.search(r"^\| single_gpu \| 0 \| 6 \| [\d,]+ \| - \|", report, re.M), report


def test_the_data_pipeline_benchmark_measures_a_worker_and_the_cache(tmp_path):
    """A 0.2 MB corpus: the raw tokenizer, one streaming worker and the memory-mapped cache
    each deliver tokens, and the JSON holds what the table shows."""
    out = tmp_path / "figures.json"
    report = run_benchmark(
        str(BENCHMARKS / "data_pipeline.py"), "--work", str(tmp_path), "--mb", "0.2",
        "--vocab", "300", "--tokenizer-mb", "0.1", "--rounds", "1", "--tokens", "20000",
        "--warmup-tokens", "2000", "--workers", "1", "--layouts", "txt", "--block-size", "64",
        "--json", str(out))
    medians = json.loads(out.read_text())["throughput"]["median"]
    assert set(medians) == {"raw encode_batch_fast, 1 thread", "txt, 1 worker",
                            "cache (memory map), txt"}
    assert all(m["tok_s"] > 0 and m["rounds_ok"] == 1 for m in medians.values())
    assert medians["txt, 1 worker"]["read_pieces"] > 0  # the worker streamed the corpus
    assert medians["txt, 1 worker"]["worker_peak_rss_mb"] > 0  # fork-server workers counted
    assert "| txt, 1 worker |" in report


def test_the_data_pipeline_benchmark_times_resumes_and_reads_peak_memory(tmp_path):
    """Its `--resume` mode (runs trained to micro-batches 2 and 4, each resumed and timed to
    its next logged step) and its `--rss` mode (a 0.3 MB one-document file, 2 steps), tiny:
    both resumes are timed and the peak RSS is read."""
    out = tmp_path / "figures.json"
    report = run_benchmark(
        str(BENCHMARKS / "data_pipeline.py"), "--work", str(tmp_path), "--mb", "0.2",
        "--vocab", "300", "--tokenizer-mb", "0.1", "--rounds", "1", "--block-size", "64",
        "--resume", "--resume-steps", "2,4", "--rss", "--rss-mb", "0.3", "--rss-steps", "2",
        "--json", str(out), timeout=600)
    figures = json.loads(out.read_text())
    resumed = figures["resume"]["median"]
    assert set(resumed) == {"2", "4"}, report
    assert all(m.get("first_step_s", 0) > 0 for m in resumed.values()), report
    assert figures["resume"]["ratio"] > 0
    rss = figures["rss"]
    assert rss["stopped"] and rss["peak_rss_mb"] > 100, report  # torch alone is more
    assert "target 4 / 2 <= 1.2x" in report and "peak RSS of one process" in report


def test_the_lm_eval_agreement_benchmark_agrees_on_a_short_text(tmp_path):
    """lm-eval and `hftrain eval` score the same 3,000 characters with a 5-step char GPT-2:
    the benchmark's own comparison (bits per byte within 0.1%) holds at this size too."""
    pytest.importorskip("lm_eval")
    report = run_benchmark(str(BENCHMARKS / "lm_eval_agreement.py"), "--work-dir",
                           str(tmp_path), "--steps", "5", "--only", "gpt2-char",
                           "--text-chars", "3000")
    [row] = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert row["bytes_text"] == 3000 and row["bytes_hftrain"] == 3000, row
    assert abs(row["lm_eval_bpb"] / row["hftrain_bpb"] - 1) < 1e-3, row
    assert "| gpt2-char | char |" in report


def test_the_mixture_benchmark_times_both_sides_of_the_pipeline_and_training():
    """benchmarks/mixture.py at 4 steps and a 4k-token shuffle: the first batch, the pipeline
    alone and training steps, each for the mixture and one source of the same files."""
    report = run_benchmark(str(BENCHMARKS / "mixture.py"), "--steps", "4", "--warmup", "1",
                           "--shuffle-tokens", "4096")
    latency = re.search(r"first batch \(s\): mixture ([\d.]+), single ([\d.]+)", report)
    assert latency and all(float(v) > 0 for v in latency.groups()), report
    assert re.search(r"pipeline alone, batches/s .*ratio \d+\.\d{3}", report), report
    assert re.search(r"ratio mixture/single: \d+\.\d{3}", report), report


def test_the_tasks_in_training_benchmark_reports_the_cost_of_scoring_during_training():
    """benchmarks/tasks_in_training.py at 4 steps and a 2,000-character task: both runs, the
    per-evaluation task time and the export scored afterwards (needs lm-eval)."""
    pytest.importorskip("lm_eval")
    report = run_benchmark(str(BENCHMARKS / "tasks_in_training.py"), "--steps", "4",
                           "--interval", "2", "--task-chars", "2000", "--corpus-chars", "20000",
                           timeout=600)
    assert re.search(r"with eval.tasks: [\d.]+ s \(ratio \d+\.\d{3}\)", report), report
    assert re.search(r"task scoring at 2 evaluations: median [\d.]+ s", report), report
    assert re.search(r"final bits_per_byte: \d+\.\d{4}", report), report
