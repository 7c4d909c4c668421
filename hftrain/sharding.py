"""Sharded training (FSDP2) on every device, CPU included, and what a sharded model needs
from the rest of the run: forwards every rank takes part in, a full state dict for the export.

Accelerate 1.16 turns `ACCELERATE_USE_FSDP=true` into FSDP only for the GPU-like distributed
types (`AcceleratorState.__init__` lists MULTI_GPU, MULTI_XPU, ...; MULTI_CPU is not among
them), although torch's FSDP2 (`fully_shard`) shards over gloo on CPU as it does over NCCL.
`enable_fsdp_on_cpu` does the one thing Accelerate leaves out: with several CPU processes and
FSDP asked for, it sets the state's distributed type to FSDP with the plugin Accelerate would
have built from the same `FSDP_*` variables. Everything after that (`prepare`, wrapping,
state dicts, checkpoints) is Accelerate's and torch's own code, as on GPUs, which is what
makes the sharded path testable on a machine without one.
"""

from __future__ import annotations

import os
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


def enable_fsdp_on_cpu(accelerator: Any) -> None:
    """With several CPU processes (MULTI_CPU, gloo) and FSDP asked for, make the run FSDP.

    Done after the Accelerator is built and before anything is prepared: the state is shared
    by every Accelerate object of the process (a Borg), so `accelerator.distributed_type`,
    `is_fsdp2`, `prepare`, `get_state_dict` and `save_state` all see FSDP from here on.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from hftrain.launch import has_accelerator_device, refuse

    state = accelerator.state
    if not fsdp_requested() or state.distributed_type != DistributedType.MULTI_CPU \
            or has_accelerator_device():  # there: Accelerate's own FSDP, or a refusal
        return
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables, as Accelerate does
    if plugin.fsdp_version != 2:
        refuse("FSDP on CPU runs FSDP2 only (torch's fully_shard): set FSDP_VERSION=2 "
                "(fsdp_version: 2 in the Accelerate config)", accelerator.is_main_process)
    if state.mixed_precision == "bf16":  # fp16 is not applied on CPU: fp32, as reported
        plugin.set_mixed_precision(state.mixed_precision)
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    for shared in (AcceleratorState._shared_state, PartialState._shared_state):
        shared["distributed_type"] = DistributedType.FSDP


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

