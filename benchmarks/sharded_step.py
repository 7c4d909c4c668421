"""The cost of a sharded training step against plain data parallel, on this machine.

Runs one recipe under `torchrun --nproc_per_node N` as DDP, as FSDP2 (full shard, the
variables `accelerate_configs/fsdp.yaml` sets) and as DeepSpeed ZeRO-2 (those of
`deepspeed_zero2.yaml`, fp32), in rounds whose order rotates, each process with one thread.
The figure is each run's median training throughput (the tokens/s of its logged windows
after the first, which holds start-up), and each sharded side's ratio to DDP per round and
its median over rounds.

    python benchmarks/sharded_step.py --rounds 3
    python benchmarks/sharded_step.py --rounds 1 --smoke --sides ddp     # a tiny model

On CPU FSDP2 pays for gathering every layer's weights before its forward and backward and
for reduce-scattering the gradients (gloo, through memory), where DDP only all-reduces the
gradients; ZeRO-2 reduce-scatters gradients and all-gathers updated weights. What sharding
buys is memory, which this does not measure.
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
LAUNCH = {
    "ddp": {},
    "fsdp2": {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
              "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
              "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP"},
    "zero2": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
              "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1", "ACCELERATE_MIXED_PRECISION": "no",
              "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none",
              "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none"},
}
"""The launch variables of each side (as `accelerate launch` sets them from the shipped
configs, fp32)."""
SMOKE = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "data.block_size=16",
         "train.max_steps=12", "train.log_interval=4", "eval.interval=1000",
         "eval.max_batches=1", "sample.max_new_tokens=0", "train.warmup_steps=2"]


def run(kind: str, recipe: Path, out: Path, processes: int, overrides: list[str]) -> float:
    """Median tokens/s of one run's logged windows after the first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(LAUNCH[kind], OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
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
    parser.add_argument("--sides", type=lambda s: s.split(","), default=list(LAUNCH),
                        help="comma-separated, ddp first (default: ddp,fsdp2,zero2)")
    args = parser.parse_args()
    if args.sides[0] != "ddp" or not set(args.sides) <= set(LAUNCH):
        parser.error(f"--sides: ddp first, then any of {', '.join(list(LAUNCH)[1:])}")
    overrides = SMOKE if args.smoke else [f"train.max_steps={args.steps}", "eval.interval=100000",
                                          "sample.max_new_tokens=0"]
    sides = args.sides
    results: dict[str, list[float]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for side in sides[i % len(sides):] + sides[:i % len(sides)]:  # rotate the order
                results[side].append(run(side, args.recipe, Path(tmp) / side,
                                         args.processes, overrides))
            print(f"round {i + 1}: " + ", ".join(
                f"{side} {results[side][-1]:,.0f} tok/s" for side in sides), flush=True)
    ratios = {side: [s / d for s, d in zip(results[side], results["ddp"], strict=True)]
              for side in sides[1:]}
    recipe = args.recipe.resolve()
    print(json.dumps({
        "recipe": str(recipe.relative_to(REPO)) if recipe.is_relative_to(REPO) else str(recipe),
        "processes": args.processes, "rounds": args.rounds,
        "tokens_per_s": results, "over_ddp": ratios,
        "median_over_ddp": {side: statistics.median(r) for side, r in ratios.items()}}))

if __name__ == "__main__":
    main()
