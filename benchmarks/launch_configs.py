"""A recipe as users launch it, under each Accelerate config: tokens/s, MFU, data wait, memory.

Each launch is a real `accelerate launch --config_file accelerate_configs/NAME.yaml -m hftrain
train RECIPE ...` (or plain `python -m hftrain train` for `none`) in its own run folder; the
figures are read back from the run's metrics.jsonl, so they are what a user's run logs. The
first `--skip` log windows (start-up, `torch.compile`) are left out of the medians.

    python benchmarks/launch_configs.py RECIPE --launch single_gpu single_gpu:compile fsdp \\
        --processes 1 --set model.n_layer=12 ... [--work-dir DIR] [--json FILE]

A launch is `CONFIG[:compile]`; `:compile` adds `train.compile=true`. With one GPU only
`single_gpu` and `fsdp` (one process) can run: Accelerate refuses `multi_gpu` below two
processes, and NCCL refuses two processes on one GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def launch_command(launch: str, processes: int | None, recipe: str,
                   overrides: list[str]) -> list[str]:
    """The command a user types for this launch, with `python -m` for the entry points."""
    config, _, option = launch.partition(":")
    if option not in ("", "compile"):
        raise SystemExit(f"launch {launch!r}: the only option is ':compile'")
    extra = ["train.compile=true"] if option == "compile" else []
    train = ["-m", "hftrain", "train", recipe, *overrides, *extra]
    if config == "none":
        return [sys.executable, *train]
    config_file = REPO / "accelerate_configs" / f"{config}.yaml"
    if not config_file.is_file():
        raise SystemExit(f"launch {launch!r}: no {config_file}")
    count = ["--num_processes", str(processes)] if processes else []
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(config_file), *count, *train]


def summarise(metrics: Path, skip: int) -> dict[str, float | int | None]:
    """Medians over the training log windows after the first `skip`, and the last evaluation."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    windows = [r for r in records if "tokens_per_s" in r][skip:]
    evaluations = [r for r in records if "val_loss" in r]

    def median(key: str) -> float | None:
        values = [r[key] for r in windows if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {"steps": records[-1].get("step") if records else None, "windows": len(windows),
            "tokens_per_s": median("tokens_per_s"), "mfu": median("mfu"),
            "data_wait": median("data_wait"), "peak_mem_gb": median("peak_mem_gb"),
            "val_loss": evaluations[-1]["val_loss"] if evaluations else None,
            "val_bpb": evaluations[-1].get("val_bpb") if evaluations else None}


def run_launch(launch: str, args: argparse.Namespace) -> dict:
    """Run one launch in its own folder; its output goes to DIR/NAME.log."""
    name = launch.replace(":", "-")
    folder = Path(args.work_dir) / name
    overrides = [f"run.output_dir={folder}", "run.overwrite=true", *args.set]
    command = launch_command(launch, args.processes, args.recipe, overrides)
    folder.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(Path(args.work_dir) / f"{name}.log", "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                              timeout=args.timeout)
    result = {"launch": launch, "exit": done.returncode,
              "wall_s": round(time.perf_counter() - start, 1), "command": " ".join(command)}
    metrics = folder / "metrics.jsonl"
    if metrics.is_file():
        result.update(summarise(metrics, args.skip))
    return result


def table(results: list[dict]) -> str:
    def cell(value, spec):
        return "-" if value is None else format(value, spec)

    lines = ["| launch | exit | steps | tokens/s | MFU | data wait | peak GB | val loss | "
             "val bpb | wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['launch']} | {r['exit']} | {cell(r.get('steps'), 'd')} | "
                     f"{cell(r.get('tokens_per_s'), ',.0f')} | {cell(r.get('mfu'), '.1%')} | "
                     f"{cell(r.get('data_wait'), '.2%')} | {cell(r.get('peak_mem_gb'), '.2f')} "
                     f"| {cell(r.get('val_loss'), '.4f')} | {cell(r.get('val_bpb'), '.4f')} | "
                     f"{r['wall_s']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--launch", nargs="+", default=["single_gpu"],
                        help="CONFIG[:compile] each; CONFIG names accelerate_configs/CONFIG.yaml"
                             " or is `none` (no accelerate launch)")
    parser.add_argument("--processes", type=int, default=None,
                        help="--num_processes for accelerate launch (default: the config's)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="recipe overrides for every launch")
    parser.add_argument("--skip", type=int, default=2, help="log windows left out of medians")
    parser.add_argument("--work-dir", default="/tmp/hftrain-launch-configs")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per launch")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = []
    for launch in args.launch:
        results.append(run_launch(launch, args))
        print(json.dumps(results[-1]), flush=True)
    print(f"recipe {args.recipe} {' '.join(args.set)} | {platform.machine()}, "
          f"{device_name()}")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if any(r["exit"] for r in results):
        sys.exit(1)


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"CPU, torch {torch.__version__}"


if __name__ == "__main__":
    main()
