"""Training-step throughput: hftrain's loop against a minimal plain-PyTorch loop.

Both sides train the identical model (same recipe, same initial weights, same optimizer
settings) on the identical batches, in the same process. They take turns one step at a time
so that machine noise hits both alike; the figure that matters is the ratio of tokens/s.

    python benchmarks/train_step.py [RECIPE] [--steps 400] [--warmup 20] [--set KEY=VALUE ...]

On a GPU, launch it as a run is launched (`accelerate launch --config_file
accelerate_configs/single_gpu.yaml benchmarks/train_step.py ...`): the plain loop then runs on
the same device under the same autocast as hftrain's, and every timed step waits for the GPU.
"""

from __future__ import annotations

import argparse
import copy
import itertools

import torch
import torch.nn.functional as F
from timing import HftrainSteps, paired_steps, report

from hftrain.data import DataStreams
from hftrain.models import build_model
from hftrain.optim import build_optimizer, build_scheduler
from hftrain.recipe import load_recipe
from hftrain.run_tokenizer import prepare_tokenizer


def plain_pytorch_step(model, optimizer, scheduler, batch, grad_clip, autocast):
    """What a hand-written loop does: forward (under the run's autocast), mean cross-entropy,
    backward, clip, step."""
    with autocast():
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe", nargs="?", default="recipes/shakespeare/gpt2-char.yaml")
    parser.add_argument("--steps", type=int, default=400, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps per side")
    parser.add_argument("--batches", type=int, default=50, help="distinct batches, cycled")
    parser.add_argument("--workers", type=int, default=1,
                        help="data.num_workers of the live stream hftrain's side reads")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="recipe overrides, as `hftrain train` takes them")
    args = parser.parse_args()

    recipe = load_recipe(args.recipe, ["run.output_dir=/tmp/hftrain-bench",
                                       f"data.num_workers={args.workers}", *args.set])
    torch.manual_seed(recipe.run.seed)
    tokenizer, _ = prepare_tokenizer(recipe)
    streams = DataStreams(recipe.data, tokenizer, seed=recipe.run.seed)
    batch_iter = streams.train_batches(recipe.train.batch_size)
    batches = [next(batch_iter) for _ in range(args.batches)]

    model = build_model(recipe.model, tokenizer, recipe.data.block_size)
    plain_model = copy.deepcopy(model)
    plain_opt = build_optimizer(plain_model, recipe.train)
    plain_sched = build_scheduler(plain_opt, recipe.train)

    loop = HftrainSteps(recipe, model)
    device = loop.accelerator.device
    plain_model.to(device)  # before its optimizer steps: the state is created on first step
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    autocast = loop.accelerator.autocast  # a fresh context per step
    live = streams.train_batches(recipe.train.batch_size)  # hftrain's side: the live stream
    plain_batches = itertools.cycle(batches)  # (its workers tokenize while the model trains)

    def hftrain_step():
        micro_batches = [next(live)]
        step = loop.optimizer_step(micro_batches)
        loop.state.add_step(step.loss, step.finite, step.tokens, len(micro_batches))

    def plain_step():
        plain_pytorch_step(plain_model, plain_opt, plain_sched, next(plain_batches),
                           recipe.train.grad_clip, autocast)

    rates = paired_steps({"hftrain": hftrain_step, "plain": plain_step}, args.steps,
                         args.warmup, batches[0]["input_ids"].numel())
    live.close()
    report(rates, f"recipe {args.recipe} | {args.steps} paired steps after {args.warmup} warm-up"
                  f" | hftrain reads a live stream with data.num_workers={args.workers}")


if __name__ == "__main__":
    main()
