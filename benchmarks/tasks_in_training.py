"""The cost of lm-eval task scores during training (`eval.tasks`), against the same run
without them and against scoring exports afterwards.

    python benchmarks/tasks_in_training.py [--steps 500] [--interval 100] [--work DIR]
    python benchmarks/tasks_in_training.py --steps 4 --interval 2 --task-chars 2000 \
        --corpus-chars 20000   # smoke test

Runs `hftrain train recipes/shakespeare/gpt2-char.yaml` (through the CLI of this interpreter,
sample off) twice, alternating: plain, then with `eval.tasks` = a local rolling
log-likelihood task over the last `--task-chars` characters of Tiny Shakespeare (lm-eval's
wikitext-style task, written by `hftrain.harness.write_rolling_task`), scored at every
evaluation by the main process. Reported: each run's wall time, the seconds the task took
at each evaluation (`task_seconds` in metrics.jsonl) and their share of the run; then the
same task scored afterwards on the export with `hftrain eval --tasks` (a process of its own:
what a user did before `eval.tasks`), whose wall time includes loading lm-eval and the model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes/shakespeare/gpt2-char.yaml"
TEXT = REPO / "recipes/data/tinyshakespeare.txt"


def timed(argv: list[str]) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "hftrain", *argv], capture_output=True,
                          text=True, cwd=REPO, env=env)
    if done.returncode != 0:
        sys.exit(f"hftrain {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def evaluations(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "val_loss" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--interval", type=int, default=100)
    parser.add_argument("--task-chars", type=int, default=20_000)
    parser.add_argument("--corpus-chars", type=int, default=None,
                        help="train on the first this many characters (default: all)")
    parser.add_argument("--work", default=None, help="a folder to keep the runs in")
    args = parser.parse_args()
    from hftrain.harness import write_rolling_task

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        text = TEXT.read_text(encoding="utf-8")[-args.task_chars:]
        write_rolling_task(work / "tasks", "shakespeare_tail", [text])
        common = [f"train.max_steps={args.steps}", f"eval.interval={args.interval}",
                  "sample.max_new_tokens=0", "run.overwrite=true"]
        if args.corpus_chars:
            corpus = work / "corpus.txt"
            corpus.write_text(TEXT.read_text(encoding="utf-8")[:args.corpus_chars],
                              encoding="utf-8")
            common.append(f"data.train_files=[{corpus}]")
        task = ["eval.tasks=[shakespeare_tail]", f"eval.task_include_path={work / 'tasks'}"]
        plain_s = timed(["train", str(RECIPE), *common, f"run.output_dir={work / 'plain'}"])
        tasks_s = timed(["train", str(RECIPE), *common, *task,
                         f"run.output_dir={work / 'tasks-run'}"])
        scored = evaluations(work / "tasks-run")
        seconds = [r["task_seconds"] for r in scored]
        export_s = timed(["eval", str(work / "tasks-run" / "final"), "--tasks",
                          "shakespeare_tail", "--include-path", str(work / "tasks")])
    print(f"GPT-2 char recipe, {args.steps} steps, evaluation every {args.interval}; task: "
          f"rolling log-likelihood of {len(text):,} characters")
    print(f"run without tasks: {plain_s:.1f} s; with eval.tasks: {tasks_s:.1f} s "
          f"(ratio {tasks_s / plain_s:.3f})")
    print(f"task scoring at {len(seconds)} evaluations: median {statistics.median(seconds):.2f} "
          f"s, total {sum(seconds):.1f} s ({sum(seconds) / tasks_s:.1%} of the run)")
    print(f"hftrain eval --tasks on the final export, a process of its own: {export_s:.1f} s")
    print(f"final bits_per_byte: {scored[-1]['task/shakespeare_tail/bits_per_byte']:.4f}")


if __name__ == "__main__":
    main()
