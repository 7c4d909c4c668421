"""Sharded training (FSDP2, DeepSpeed ZeRO) on every device, CPU included, and what a
sharded model needs from the rest of the run: forwards every rank takes part in, a full
state dict for the export, DeepSpeed told the recipe's batch, accumulation and clipping.

Accelerate 1.16 turns `ACCELERATE_USE_FSDP=true` into FSDP only for the GPU-like distributed
types (`AcceleratorState.__init__` lists MULTI_GPU, MULTI_XPU, ...; MULTI_CPU is not among
them), and DeepSpeed only without `cpu` (where, with no GPU, it leaves each process alone),
although torch's FSDP2 (`fully_shard`) and DeepSpeed's ZeRO shard over gloo on CPU as they do
over NCCL. `enable_sharding_on_cpu` does the one thing Accelerate leaves out: with several CPU
processes it sets the state's distributed type to FSDP or DEEPSPEED with the plugin
Accelerate would have built from the same launch variables. Everything after that
(`prepare`, wrapping, state dicts, checkpoints) is Accelerate's, torch's and DeepSpeed's own
code, as on GPUs, which is what makes the sharded paths testable on a machine without one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

FSDP_ENV = "ACCELERATE_USE_FSDP"


def fsdp_requested() -> bool:
    """Whether the launch asks for FSDP the way Accelerate acts on it (the value 'true')."""
    return os.environ.get(FSDP_ENV, "false").strip().lower() == "true"


def wrap_each_layer_by_default() -> None:
    """FSDP asked for without a wrap policy (`torchrun` with `ACCELERATE_USE_FSDP=true` and no
    `FSDP_AUTO_WRAP_POLICY`) would make the whole model one unit, gathered whole for every
    forward, which saves no memory. Default to one unit per layer, the class taken from the
    model's own `_no_split_modules` (GPT2Block, LlamaDecoderLayer, the recurrent stack), as
    Accelerate does when a config names no class. Called before the Accelerator is built."""
    if fsdp_requested():
        os.environ.setdefault("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")


def enable_sharding_on_cpu(accelerator: Any) -> None:
    """With several CPU processes (MULTI_CPU, gloo) and FSDP or DeepSpeed asked for, make the
    run FSDP2 or DeepSpeed, with the plugin Accelerate would have built from the same launch
    variables (`FSDP_*`, `ACCELERATE_DEEPSPEED_*`).

    Done after the Accelerator is built and before anything is prepared: the state is shared
    by every Accelerate object of the process (a Borg), so `accelerator.distributed_type`,
    `is_fsdp2`, `prepare`, `get_state_dict` and `save_state` all see it from here on. Where
    an accelerator device is present this does nothing: Accelerate's own set-up runs there
    (or `launch.check_sharding_set_up` refuses what it did not set up).
    """
    from accelerate.utils import DistributedType

    from hftrain.launch import has_accelerator_device

    if accelerator.distributed_type != DistributedType.MULTI_CPU or has_accelerator_device():
        return
    if fsdp_requested():
        _promote_to_fsdp(accelerator)
    elif deepspeed_requested():
        _promote_to_deepspeed(accelerator)


def _promote_to_fsdp(accelerator: Any) -> None:
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from hftrain.launch import refuse

    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables, as Accelerate does
    if plugin.fsdp_version != 2:
        refuse("FSDP on CPU runs FSDP2 only (torch's fully_shard): set FSDP_VERSION=2 "
               "(fsdp_version: 2 in the Accelerate config)", accelerator.is_main_process)
    if accelerator.state.mixed_precision == "bf16":  # fp16 is not applied on CPU: fp32
        plugin.set_mixed_precision("bf16")
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    _set_distributed_type(DistributedType.FSDP)


def _promote_to_deepspeed(accelerator: Any) -> None:
    """As `AcceleratorState.__init__` does for DeepSpeed: the plugin takes the precision
    (DeepSpeed casts, Accelerate autocasts nothing) and is selected as the active one. The
    engine finds torch's process group (gloo) already started and uses it."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    plugin = DeepSpeedPlugin()  # from the ACCELERATE_DEEPSPEED_* variables
    precision = accelerator.state.mixed_precision
    plugin.set_mixed_precision("bf16" if precision == "bf16" else "no")  # no fp16 on CPU
    plugin.select(_from_accelerator_state=True)
    AcceleratorState._shared_state["deepspeed_plugins"] = plugin
    AcceleratorState._shared_state["_mixed_precision"] = "no"
    _set_distributed_type(DistributedType.DEEPSPEED)


def _set_distributed_type(kind: Any) -> None:
    from accelerate.state import AcceleratorState, PartialState

    for shared in (AcceleratorState._shared_state, PartialState._shared_state):
        shared["distributed_type"] = kind


def deepspeed_requested() -> bool:
    """Whether the launch asks for DeepSpeed the way Accelerate acts on it ('true')."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").strip().lower() == "true"


def configure_deepspeed(accelerator: Any, train: Any) -> None:
    """Give DeepSpeed the recipe's batch, accumulation and clipping before `prepare`.

    Accelerate fills `auto` values in the DeepSpeed config from the DataLoaders it prepares;
    hftrain prepares none (its data streams are its own), so the micro-batch would stay
    `auto` and `prepare` raise, and the launch config's `gradient_accumulation_steps` (1)
    and DeepSpeed's default clipping (1.0) would silently replace the recipe's. The engine
    skips a step whose gradient norm is not finite (fp32 always; bf16 with
    `check_grad_overflow`, set here): that is the NaN skip under DeepSpeed.
    """
    from accelerate.utils import DistributedType

    from hftrain.launch import refuse

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    if train.optimizer == "muon":
        refuse("train.optimizer muon cannot run under DeepSpeed (ZeRO flattens the weight "
               "matrices Muon orthogonalises): use adamw, or FSDP / DDP for muon",
               accelerator.is_main_process)
    plugin = accelerator.state.deepspeed_plugin
    # the plugin's config, and the copy Accelerate's `get_value` / `fill_match` read
    for config in {id(c): c for c in (plugin.deepspeed_config,
                                      plugin.hf_ds_config.config)}.values():
        config["train_micro_batch_size_per_gpu"] = train.batch_size
        config["gradient_accumulation_steps"] = train.grad_accum_steps
        config["train_batch_size"] = train.global_batch(accelerator.num_processes)
        config["gradient_clipping"] = float(train.grad_clip)
        if config.get("bf16", {}).get("enabled") in (True, "auto"):
            config["bf16"]["check_grad_overflow"] = True
    plugin.gradient_accumulation_steps = train.grad_accum_steps
    accelerator.gradient_accumulation_steps = train.grad_accum_steps


@contextmanager
def building_the_model(accelerator: Any) -> Iterator[None]:
    """Where the model is built. Under DeepSpeed ZeRO-3 Accelerate registers the DeepSpeed
    config with transformers, whose `from_config` then builds inside `deepspeed.zero.Init`:
    every rank initialises only its partition, with its own random draws, so the weights
    differ from the seeded unsharded model's. That is what `zero3_init_flag: true` asks for
    (a model too large for one device is never whole); with the flag off (the shipped
    config), the model is built whole and seeded, as unsharded, and partitioned by
    `prepare`."""
    plugin = _zero3_plugin(accelerator)
    if plugin is None or plugin.zero3_init_flag:
        yield
        return
    from transformers.integrations.deepspeed import (
        set_hf_deepspeed_config,
        unset_hf_deepspeed_config,
    )

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(plugin.dschf)


def _zero3_plugin(accelerator: Any) -> Any:
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    plugin = accelerator.state.deepspeed_plugin
    return plugin if plugin.zero_stage == 3 else None


def is_sharded(accelerator: Any) -> bool:
    """Whether the model's parameters are split over the processes, so that every forward
    needs every process (FSDP; DeepSpeed ZeRO-3)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return True
    if kind == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return False


def bare_model(accelerator: Any, model: Any) -> Any:
    """The model itself: without DDP/FSDP wrappers and without torch.compile's."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def plain_class(module: torch.nn.Module) -> type:
    """The model's own class: FSDP2's `fully_shard` swaps a module's class for a subclass
    `FSDP<Name>(FSDPModule, <Name>)`; the first class in its MRO that is not FSDP's is the
    model's."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def gathered_model(accelerator: Any, model: Any, bare: Any) -> Any:
    """The trained model in one piece, on the main process's CPU (None on the others): the
    full state dict is gathered from the shards (every process takes part) and loaded into
    a plain copy of the model built from its config (with LoRA, a plain PEFT model with the
    same adapters, so `merge_and_unload` works on whole tensors instead of shards)."""
    state_dict = accelerator.get_state_dict(model)  # collective: every rank
    if not accelerator.is_main_process:
        return None
    from hftrain.models.base import is_lora

    # The copy's random initialisation (overwritten by the gathered weights) leaves the RNG
    # where it was: the end-of-run sample draws what an unsharded run of the recipe draws.
    with torch.random.fork_rng(devices=[]):
        if is_lora(bare):
            from peft import get_peft_model

            base = bare.get_base_model()
            plain = get_peft_model(_plain_copy(base), bare.peft_config["default"])
        else:
            plain = _plain_copy(bare)
    plain.load_state_dict(state_dict)
    return plain


def _plain_copy(model: Any) -> Any:
    """A freshly built, unsharded model of the same class and config, on the CPU."""
    with torch.device("cpu"):
        copy = plain_class(model)(model.config)
    copy.generation_config = model.generation_config
    return copy

