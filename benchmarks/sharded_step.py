"""The cost of a sharded training step against plain data parallel, on this machine.

Runs one recipe under `torchrun --nproc_per_node N` as DDP and as FSDP2 (full shard, the
variables `accelerate_configs/fsdp.yaml` sets), in alternating rounds (DDP first in odd
rounds, FSDP2 first in even ones), each process with one thread. The figure is each run's
median training throughput (the tokens/s of its logged windows after the first, which holds
start-up), and the ratio FSDP2 / DDP per round and its median over rounds.

    python benchmarks/sharded_step.py --rounds 3
    python benchmarks/sharded_step.py --rounds 1 --smoke     # seconds: a tiny model

On CPU the sharded step pays for gathering every layer's weights before its forward and
backward and for reduce-scattering the gradients (gloo, through memory), where DDP only
all-reduces the gradients; what it buys is memory, which this does not measure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "shakespeare" / "gpt2-char.yaml"
FSDP = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
        "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}
SMOKE = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "data.block_size=16",
         "train.max_steps=12", "train.log_interval=4", "eval.interval=1000",
         "eval.max_batches=1", "sample.max_new_tokens=0", "train.warmup_steps=2"]


def run(kind: str, recipe: Path, out: Path, processes: int, overrides: list[str]) -> float:
    """Median tokens/s of one run's logged windows after the first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(FSDP if kind == "fsdp2" else {}, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    subprocess.run([torchrun, "--nproc_per_node", str(processes), "-m", "hftrain", "train",
                    str(recipe), f"run.output_dir={out}", "run.overwrite=true", *overrides],
                   check=True, cwd=REPO, env=env, capture_output=True, text=True)
    windows = [r["tokens_per_s"] for r in map(json.loads, (out / "metrics.jsonl").open())
               if "tokens_per_s" in r]
    return statistics.median(windows[1:] or windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--smoke", action="store_true", help="a tiny model, a few steps")
    args = parser.parse_args()
    overrides = SMOKE if args.smoke else [f"train.max_steps={args.steps}", "eval.interval=100000",
                                          "sample.max_new_tokens=0"]
    results: dict[str, list[float]] = {"ddp": [], "fsdp2": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            order = ["ddp", "fsdp2"] if i % 2 == 0 else ["fsdp2", "ddp"]
            for kind in order:
                results[kind].append(run(kind, args.recipe, Path(tmp) / kind,
                                         args.processes, overrides))
            print(f"round {i + 1}: ddp {results['ddp'][-1]:,.0f} tok/s, fsdp2 "
                  f"{results['fsdp2'][-1]:,.0f} tok/s, fsdp2/ddp "
                  f"{results['fsdp2'][-1] / results['ddp'][-1]:.3f}", flush=True)
    ratios = [f / d for f, d in zip(results["fsdp2"], results["ddp"], strict=True)]
    print(json.dumps({"recipe": str(args.recipe.relative_to(REPO)) if args.recipe.is_relative_to(
        REPO) else str(args.recipe), "processes": args.processes, "rounds": args.rounds,
        "ddp_tokens_per_s": results["ddp"], "fsdp2_tokens_per_s": results["fsdp2"],
        "fsdp2_over_ddp": ratios, "median_ratio": statistics.median(ratios)}))


if __name__ == "__main__":
    main()
