"""What the launch asked for against what Accelerate set up: said once at start-up, and
refused or warned about where Accelerate would quietly do something else.

Accelerate reads its launch config from environment variables that `accelerate launch` sets
(`ACCELERATE_USE_FSDP`, `ACCELERATE_USE_DEEPSPEED`, `ACCELERATE_MIXED_PRECISION`, `FSDP_*`)
and falls back without a word where it cannot do what they ask:

- FSDP and DeepSpeed shard only on accelerators in Accelerate's own code. hftrain turns them
  on for several CPU processes too (`hftrain.sharding.enable_sharding_on_cpu`: FSDP2 and ZeRO
  shard over gloo); in a single CPU process either would train unsharded. A run asked to
  shard usually asks because the unsharded model or optimizer state does not fit; hftrain
  refuses that (exit status 2, before anything is written) rather than start a run whose
  memory, speed and checkpoints are not the ones asked for.
- fp16 autocast does not exist on CPU: Accelerate trains in fp32 and still reports fp16.
- bf16 autocast on a CPU without bf16 instructions (AVX2 only, say) works but is emulated:
  about 10x slower than fp32. Both train correctly, so they warn rather than refuse.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from hftrain.errors import HftrainError, ReportedByMainProcess

SHARDING_ENV = {"FSDP": "ACCELERATE_USE_FSDP", "DeepSpeed": "ACCELERATE_USE_DEEPSPEED"}
"""The variables through which `accelerate launch --config_file` (distributed_type: FSDP or
DEEPSPEED) asks for sharding."""

TRUE_WORDS = ("1", "true", "yes", "on", "y", "t")
"""What counts as "asked for" (accelerate's own `str_to_bool`). Accelerate itself acts only on
'true', so `ACCELERATE_USE_FSDP=1` is asked for and silently not done: refused as well."""

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
"""CPU flags (x86 `flags`, Arm `Features` in /proc/cpuinfo) of native bf16 arithmetic."""

BF16_EMULATED_COST = ("about 10x slower than fp32 (9.5x measured for the Shakespeare GPT-2 "
                      "on an AVX2 CPU)")


def requested_sharding() -> dict[str, str]:
    """`{"FSDP": "ACCELERATE_USE_FSDP=true", ...}`: the sharding the launch asked for."""
    asked = {}
    for name, var in SHARDING_ENV.items():
        value = os.environ.get(var, "")
        if value.strip().lower() in TRUE_WORDS:
            asked[name] = f"{var}={value}"
    return asked


def has_accelerator_device() -> bool:
    """Whether torch sees a GPU or another accelerator (Accelerate shards only there)."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None:
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def runs_on_cpu(cpu: bool) -> bool:
    """Whether the Accelerator about to be built will use the CPU: asked with `cpu`
    (hftrain's torchrun-on-CPU case), through `ACCELERATE_USE_CPU` (`use_cpu: true`), or
    because there is no accelerator at all."""
    forced = os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in TRUE_WORDS
    return cpu or forced or not has_accelerator_device()


def refuse(message: str, is_main: bool) -> None:
    """Every process decides the same from the same environment: rank 0 says why, the others
    exit quietly with the same status (and any process group is closed first, as on any
    refusal under torchrun)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    raise HftrainError(message) if is_main else ReportedByMainProcess(message)


def _how_to_launch(names: list[str]) -> str:
    if len(names) == 1:
        variable = SHARDING_ENV[names[0]] + "=true" + (" FSDP_VERSION=2" * (names[0] == "FSDP"))
        return (f"launch several processes ({names[0]} on CPU: {variable} torchrun "
                "--nproc_per_node N -m hftrain train RECIPE; see README \"Launching on GPUs "
                f"and clusters\"), or drop the {names[0]} config")
    return (f"launch on GPUs, or without the {'/'.join(names)} config (CPU data parallel: "
            "torchrun --nproc_per_node N -m hftrain train RECIPE; see accelerate_configs/)")


def check_sharding_before_start(cpu: bool) -> None:
    """Refuse sharding that will not happen on CPU before the Accelerator is built: FSDP or
    DeepSpeed in a single process (nothing to shard over), or both at once. Over several CPU
    processes either runs (`hftrain.sharding`)."""
    asked = requested_sharding()
    if not asked or not runs_on_cpu(cpu):
        return
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1 and len(asked) == 1:  # FSDP or DeepSpeed over several CPU processes
        return
    names = list(asked)
    why = ("FSDP and DeepSpeed are two ways to shard: ask for one" if len(asked) > 1
           else f"{names[0]} needs several processes to shard over")
    refuse(f"the launch asks for {' and '.join(names)} ({', '.join(asked.values())}) but this "
           f"run is on CPU with {processes} process{'es' if processes > 1 else ''}, where {why}: "
           f"it would train unsharded without saying so; {_how_to_launch(names)}",
           os.environ.get("RANK", "0") == "0")


def check_sharding_set_up(accelerator: Any) -> None:
    """Refuse a run whose Accelerator did not set up the sharding the launch asked for (on an
    accelerator too: one process started without `accelerate launch`, a value other than
    'true')."""
    from accelerate.utils import DistributedType

    got = accelerator.distributed_type
    wanted = {"FSDP": DistributedType.FSDP, "DeepSpeed": DistributedType.DEEPSPEED}
    asked = requested_sharding()
    missing = [name for name in asked if got != wanted[name]]
    if not missing:
        return
    refuse(f"the launch asks for {' and '.join(missing)} "
           f"({', '.join(asked[name] for name in missing)}) but Accelerate set up "
           f"{got.value} on {accelerator.device.type} with {_processes(accelerator)}, which "
           f"does not shard; {_how_to_launch(missing)}", accelerator.is_main_process)


def _processes(accelerator: Any) -> str:
    n = accelerator.num_processes
    return f"{n} process{'es' if n > 1 else ''}"


def autocast_applies(accelerator: Any) -> bool:
    """Whether the mixed precision Accelerate reports is what the forward pass runs in
    (fp16 is reported on CPU but not applied: no autocast there, fp32 runs)."""
    from accelerate.utils import DistributedType

    if accelerator.mixed_precision == "no":
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # its own config casts
        return True
    return bool(accelerator.native_amp)


def describe_setup(accelerator: Any) -> str:
    """One line: processes, device, distributed type (and backend), mixed precision as it
    runs, the sharding in use, and on CPU whether bf16 is native; e.g. `accelerate:
    2 processes on cpu, MULTI_CPU (gloo), mixed precision no, bf16 native`."""
    from accelerate.utils import DistributedType

    state = accelerator.state
    kind = accelerator.distributed_type
    backend = getattr(state, "backend", None)
    distributed = kind.value + (f" ({backend})" if backend and kind != DistributedType.NO
                                else " (not distributed)" if kind == DistributedType.NO else "")
    precision = accelerator.mixed_precision
    if not autocast_applies(accelerator):
        precision = f"{precision} asked, not applied on {accelerator.device.type}: fp32"
    line = (f"accelerate: {_processes(accelerator)} on {accelerator.device.type}, "
            f"{distributed}, mixed precision {precision}")
    return line + _sharding_details(state, kind) + describe_bf16(accelerator.device.type)


def _sharding_details(state: Any, kind: Any) -> str:
    """`, FSDP2 (full shard, CPU offload)` or `, DeepSpeed ZeRO-2`; '' if none."""
    from accelerate.utils import DistributedType

    if kind == DistributedType.FSDP:
        plugin = getattr(state, "fsdp_plugin", None)
        version = getattr(plugin, "fsdp_version", "")
        notes = []
        reshard = getattr(plugin, "reshard_after_forward", None)  # FSDP2: a bool
        if isinstance(reshard, bool):
            notes.append("full shard" if reshard else "no reshard after forward")
        elif reshard is not None:  # FSDP1: a ShardingStrategy
            notes.append(getattr(reshard, "name", str(reshard)))
        offload = getattr(getattr(plugin, "cpu_offload", None), "offload_params", False)
        if offload:
            notes.append("CPU offload")
        return f", FSDP{version}" + (f" ({', '.join(notes)})" if notes else "")
    if kind == DistributedType.DEEPSPEED:
        plugin = getattr(state, "deepspeed_plugin", None)
        return f", DeepSpeed ZeRO-{getattr(plugin, 'zero_stage', '?')}"
    return ""


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """Whether the CPU has bf16 instructions (avx512_bf16 or amx_bf16 on x86, bf16 on Arm);
    None where it cannot be told (no /proc/cpuinfo: not Linux)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return any(flag in value.split() for flag in BF16_CPU_FLAGS)
    return None


@functools.cache
def bf16_is_native(device_type: str) -> bool:
    """Whether bf16 matrix products run natively on this device type, faster than fp32: CUDA
    GPUs with bf16 (Ampere on), CPUs with avx512_bf16, AMX or Arm's bf16 *and* a oneDNN that
    uses them (`ONEDNN_MAX_CPU_ISA=AVX2` turns them off, as on an AVX2-only CPU). Elsewhere
    bf16 is emulated: a 128x512 @ 512x128 product took 6.6 ms against fp32's 0.08 ms (one
    thread, Xeon with AMX capped to AVX2), so code that may choose (Muon's orthogonalisation)
    takes fp32 there. Asked once per process: the answer does not change."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(
            including_emulation=False)
    if device_type != "cpu" or cpu_has_native_bf16() is not True:
        return False
    try:  # a private op (torch >= 2.0): what oneDNN's bf16 kernels run on here
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True  # the flags say native; a torch without the op cannot say otherwise


def describe_bf16(device_type: str) -> str:
    """The start-up line's note on bf16: where it is emulated, what hftrain does instead."""
    if device_type != "cpu":
        return ""
    return (", bf16 native" if bf16_is_native(device_type) else
            ", bf16 emulated (no avx512_bf16/AMX): Muon orthogonalises in fp32")


def precision_warning(accelerator: Any, asked_in_recipe: str | None) -> str | None:
    """The warning for a mixed precision that costs a lot or does nothing on this CPU, or
    None. `asked_in_recipe` is `train.mixed_precision` (unset: Accelerate's config chose)."""
    precision = accelerator.mixed_precision
    if accelerator.device.type != "cpu" or precision not in ("bf16", "fp16"):
        return None
    source = (f"train.mixed_precision {precision}" if asked_in_recipe else
              f"mixed precision {precision} (from the Accelerate config or "
              "ACCELERATE_MIXED_PRECISION)")
    if not autocast_applies(accelerator):
        return (f"{source} is not applied on CPU (Accelerate autocasts fp16 only on GPUs and "
                "other accelerators): this run trains in fp32. Set train.mixed_precision=no "
                "to say what runs")
    if precision == "bf16" and cpu_has_native_bf16() is not None \
            and not bf16_is_native("cpu"):
        return (f"{source} on a CPU without bf16 instructions (no avx512_bf16 or amx_bf16) is "
                f"emulated: expect training {BF16_EMULATED_COST}; set "
                "train.mixed_precision=no for fp32")
    return None


def report_setup(accelerator: Any, asked_in_recipe: str | None) -> None:
    """Print what Accelerate set up (stdout) and any precision warning (stderr), once, from
    the main process."""
    if not accelerator.is_main_process:
        return
    print(describe_setup(accelerator))
    warning = precision_warning(accelerator, asked_in_recipe)
    if warning:
        print(f"hftrain: warning: {warning}", file=sys.stderr)


RUN_RECORD = "hftrain_run.json"
"""The export's record of how it was trained (processes, device, precision): the recipe
alone does not say, since `train.batch_size` is per process and the launch decides the rest."""


def run_record(accelerator: Any, recipe: Any) -> dict[str, Any]:
    """What the export's `hftrain_run.json` holds: the processes and the global batch they
    made (the model card's figure), and the device, distributed type and precision that ran."""
    cfg = recipe.train
    return {
        "processes": accelerator.num_processes,
        "global_batch_blocks": cfg.global_batch(accelerator.num_processes),
        "device": accelerator.device.type,
        "distributed_type": accelerator.distributed_type.value,
        "mixed_precision": precision_that_runs(accelerator),
    }


def precision_that_runs(accelerator: Any) -> str:
    """The mixed precision the forward pass runs in ('no' where fp16 is asked on CPU)."""
    return accelerator.mixed_precision if autocast_applies(accelerator) else "no"


def launch_trajectory(accelerator: Any) -> dict[str, Any]:
    """What the launch decides about a run's updates, which a resume must match: the number
    of processes, the sharding (FSDP, DEEPSPEED ZeRO-n or none: the checkpoints differ too; a
    run may move between CPU and GPU data parallel) and the mixed precision that runs (not
    merely the one asked for)."""
    kind = accelerator.distributed_type.value
    sharding = kind if kind in ("FSDP", "DEEPSPEED") else "none"
    if kind == "DEEPSPEED":  # ZeRO-2 and ZeRO-3 checkpoints do not load into each other
        sharding += f" ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    return {"processes": accelerator.num_processes,
            "launch.sharding": sharding,
            "launch.mixed_precision": precision_that_runs(accelerator)}


def write_run_record(accelerator: Any, recipe: Any, folder: Path) -> None:
    """Write `hftrain_run.json` into an export folder being written."""
    text = json.dumps(run_record(accelerator, recipe), indent=2) + "\n"
    (folder / RUN_RECORD).write_text(text, encoding="utf-8")
