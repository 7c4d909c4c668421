"""This process's set-up for a run: the data workers' server, and the Accelerator a recipe
trains on, with every check that needs the launch before it.

Accelerate decides the devices, the processes and the precision from its launch variables;
hftrain adds what Accelerate leaves out on CPU (gloo for several processes, FSDP2 and ZeRO
sharding: `hftrain.sharding`), refuses a launch that would not do what it asks in one line
(`hftrain.launch`), and says once what runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from hftrain.allocator import keep_freed_heap_memory
from hftrain.errors import naming_the_recipe
from hftrain.launch import (
    check_sharding_before_start,
    check_sharding_set_up,
    precision_that_runs,
    report_setup,
)
from hftrain.models import check_attention_available, check_attention_precision
from hftrain.recipe import Recipe
from hftrain.sharding import enable_sharding_on_cpu, wrap_each_layer_by_default
from hftrain.workers import check_not_a_worker, start_worker_server


def set_up_process(recipe: Recipe, recipe_path: Path | None, trackers: list[str]) -> Accelerator:
    """The run's Accelerator, seeded, after the checks a launch can fail (attention kernels
    the device lacks, sharding Accelerate would not apply): each one line naming the key.
    The data workers' fork server starts first: its imports overlap the Accelerator's."""
    check_not_a_worker()
    if recipe.data.num_workers:
        start_worker_server()
    with naming_the_recipe(recipe_path):
        check_attention_available(recipe.model)
    cpu = cpu_data_parallel()
    check_sharding_before_start(cpu=cpu)  # Accelerate would not shard
    wrap_each_layer_by_default()
    accelerator = Accelerator(
        mixed_precision=recipe.train.mixed_precision,
        cpu=cpu,
        log_with=trackers or None,
        project_dir=str(Path(recipe.run.output_dir)),
        dynamo_backend="inductor" if recipe.train.compile else None,
    )
    enable_sharding_on_cpu(accelerator)  # Accelerate shards only on GPUs; FSDP2 and ZeRO on CPU
    check_sharding_set_up(accelerator)
    report_setup(accelerator, recipe.train.mixed_precision)  # what runs, said once
    with naming_the_recipe(recipe_path):
        check_attention_precision(recipe.model, precision_that_runs(accelerator))
    keep_freed_heap_memory(accelerator.device)
    set_seed(recipe.run.seed)
    return accelerator


def cpu_data_parallel() -> bool:
    """Several processes (torchrun) and no GPU: Accelerate must be told to use gloo on CPU."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
