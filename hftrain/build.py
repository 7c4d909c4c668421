"""Everything a run is built from, made (and so checked) before the run folder is written.

Order matters for "bad input loses nothing": the tokenizer is built, the first batches are
pulled from both data splits and the model, optimizer and schedule are built before anything
of the run is written, so a missing file, an empty corpus, an over-long block or a bad setting
fails with nothing written (but the token cache, which is the data's, not the run's).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from hftrain.data import DataStreams, TrainBatches
from hftrain.data import cache as token_cache
from hftrain.errors import RecipeError, naming_the_recipe
from hftrain.export import generation_config
from hftrain.memory import check_fits, model_sizes
from hftrain.models import build_model
from hftrain.nodes import build_once_per_filesystem, on_every_process
from hftrain.optim import build_optimizer, build_scheduler
from hftrain.recipe import Recipe
from hftrain.run_tokenizer import prepare_tokenizer
from hftrain.sharding import building_the_model, configure_deepspeed, is_sharded
from hftrain.workers import usable_cpus, worker_count


@dataclass
class RunParts:
    """The tokenizer, the data, and the model, optimizer and schedule, prepared by Accelerate."""

    tokenizer: Any
    tokenizer_built: bool
    """Built from the corpus by this call (so the run folder saves it), not reused."""
    streams: DataStreams
    batches: TrainBatches
    """The training stream, its first batch already pulled with `peek`."""
    first_batch: dict[str, torch.Tensor]
    model: Any
    optimizer: Any
    scheduler: Any


def build_parts(recipe: Recipe, accelerator: Accelerator, recipe_path: Path | None = None,
                builds_cache: bool = True) -> RunParts:
    """Tokenizer, data (one batch of each split pulled), model, optimizer, schedule and the
    generation settings: a bad file or setting fails here, with nothing written but the token
    cache (built where `builds_cache`)."""
    tokenizer, built = on_every_process(accelerator, lambda: prepare_tokenizer(recipe))
    check_resources(recipe, accelerator, tokenizer, recipe_path)
    if recipe.data.cache:  # tokenized once per filesystem, before any rank reads it

        def prepare_cache() -> dict[str, dict[str, Any]] | None:
            folders = [token_cache.prepare(alone, tokenizer)  # a mixture: each source's
                       for alone in recipe.data.by_source()]
            if accelerator.num_processes == 1:
                return None
            return {str(folder): token_cache.split_digests(folder) for folder in folders}

        build_once_per_filesystem(accelerator, builds_cache, prepare_cache)

    def set_up_data() -> tuple[DataStreams, TrainBatches, dict[str, torch.Tensor]]:
        streams = DataStreams(recipe.data, tokenizer, seed=recipe.run.seed,
                              stateful=recipe.train.stateful, rank=accelerator.process_index,
                              world_size=accelerator.num_processes,
                              pin_memory=accelerator.device.type == "cuda")
        batches = streams.train_batches(recipe.train.batch_size)
        first_batch = batches.peek()
        streams.check_scored(first_batch)
        streams.check_val(recipe.eval.batch_size)
        return streams, batches, first_batch

    # each node reads its own disk (its copy of the data, its cache): a refusal on one node
    streams, batches, first_batch = on_every_process(accelerator, set_up_data)  # stops all
    check_dpo_launch(recipe, accelerator)
    with naming_the_recipe(recipe_path), building_the_model(accelerator):
        model = build_model(recipe.model, tokenizer, recipe.data.block_size,
                            recipe.train.gradient_checkpointing)
        if not is_sharded(accelerator):  # sharded: `prepare` puts each rank's shard there
            model.to(accelerator.device)
        optimizer = build_optimizer(model, recipe.train, accelerator.device)
    model.generation_config = generation_config(recipe, tokenizer)
    configure_deepspeed(accelerator, recipe.train)
    client_optimizer = optimizer
    model, optimizer = accelerator.prepare(model, optimizer)
    # after `prepare`: DeepSpeed's ZeRO regroups the client optimizer's parameters
    scheduler = build_scheduler(client_optimizer, recipe.train)
    return RunParts(tokenizer, built, streams, batches, first_batch, model, optimizer,
                    scheduler)


def check_dpo_launch(recipe: Recipe, accelerator: Accelerator) -> None:
    """DPO's reference model is a plain copy on each process: a sharded launch would hold
    the whole reference on every rank beside the policy's shard, so it is refused (every
    process finds it: a RecipeError, said once a node)."""
    if recipe.train.objective == "dpo" and is_sharded(accelerator):
        raise RecipeError("train.objective dpo runs on one process or under DDP (each "
                           "process holds the reference model whole); this launch shards "
                           "the model (FSDP or DeepSpeed): launch without sharding")


def check_resources(recipe: Recipe, accelerator: Accelerator, tokenizer: Any,
                    recipe_path: Path | None) -> None:
    """Before anything large is allocated: refuse sizes that cannot fit in memory (one line
    naming the key), and say when fewer data workers start than the recipe asks for."""
    with naming_the_recipe(recipe_path), building_the_model(accelerator):
        sizes = model_sizes(recipe.model, tokenizer, recipe.data.block_size)
    shards = accelerator.num_processes if is_sharded(accelerator) else 1
    on_every_process(accelerator, lambda: check_fits(recipe, len(tokenizer), sizes,
                                                     accelerator.device, shards))
    workers = recipe.data.num_workers
    if accelerator.is_main_process and worker_count(workers) < workers:
        print(f"hftrain: warning: data.num_workers {workers} is more than the "
              f"{usable_cpus()} CPUs this process may use; {worker_count(workers)} workers "
              "read the data (the batches are the same)", file=sys.stderr)


def print_global_batch(accelerator: Accelerator, recipe: Recipe,
                       batch: dict[str, torch.Tensor]) -> None:
    cfg, processes = recipe.train, accelerator.num_processes
    accelerator.print(
        f"global batch: {cfg.global_batch(processes)} blocks x {batch['input_ids'].shape[1]} "
        f"tokens (batch_size {cfg.batch_size} x grad_accum_steps {cfg.grad_accum_steps} x "
        f"{processes} process{'es' if processes > 1 else ''})"
    )
