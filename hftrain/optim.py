"""Optimizers (torch's own: AdamW, Adam, SGD, RMSprop, Adafactor, Muon) with their parameter
groups, and a `transformers` learning-rate schedule.

hftrain writes only the grouping. Every optimizer decays matrices and embeddings, never biases
or norm scales (nanoGPT's rule: dim >= 2). `muon` splits the model as modded-nanogpt and
nanochat do: Muon for the 2-D hidden weight matrices, AdamW for everything else, each part
with its own learning rate, held in one optimizer object (`MuonWithAdamW`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from transformers import get_scheduler
from transformers.pytorch_utils import Conv1D

from hftrain.errors import HftrainError
from hftrain.launch import bf16_is_native
from hftrain.recipe import TrainConfig


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings; never biases or norm scales (nanoGPT's rule: dim >= 2)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def _fused(model: torch.nn.Module) -> bool:
    # The fused kernel does the whole update in one op: ~10% of a small model's step on CPU.
    return next(model.parameters()).device.type in ("cpu", "cuda")


def build_optimizer(model: torch.nn.Module, config: TrainConfig,
                    device: torch.device | None = None) -> torch.optim.Optimizer:
    """The recipe's optimizer over `model`'s trainable parameters. `device` is where the
    training runs (the parameters' device unless given: a model is built on the CPU and
    moved, or sharded, later); Muon orthogonalises in bf16 only where bf16 is native there."""
    if config.optimizer == "muon":
        device = device or next(model.parameters()).device
        return build_muon(model, config, torch.bfloat16 if bf16_is_native(device.type)
                          else torch.float32)
    groups = parameter_groups(model, config.weight_decay)
    betas = (config.beta1, config.beta2)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov)
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=config.lr, alpha=config.beta2,
                                   momentum=config.momentum)
    if config.optimizer == "adafactor":
        return torch.optim.Adafactor(groups, lr=config.lr)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr, betas=betas, fused=_fused(model))
    return torch.optim.AdamW(groups, lr=config.lr, betas=betas, fused=_fused(model))


# --- Muon ---------------------------------------------------------------------------------


def muon_split(model: torch.nn.Module) -> tuple[list[tuple[str, torch.Tensor, float]],
                                                list[tuple[str, torch.Tensor]]]:
    """The trainable parameters as (Muon, AdamW): Muon takes exactly the 2-D hidden weight
    matrices (attention and MLP projections, recurrent weight matrices, a recurrent model's
    projection to a tied embedding's width), AdamW the embeddings (token and position), the
    output head (tied to the embedding or not), norms and biases. A tied matrix is one
    parameter and lands once, in AdamW. Names are `model.named_parameters()`'s.

    Each Muon entry carries a learning-rate factor: torch's Muon scales a matrix's step by
    sqrt(max(1, rows / cols)) (Keller Jordan's rule for an (out, in) `nn.Linear` weight), but
    GPT-2's `Conv1D` stores its weight as (in, out); the factor restores the rule for it.
    """
    owner: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owner.setdefault(id(p), module)
    not_hidden = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding)
                  for p in m.parameters()}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            module = None
        if isinstance(module, torch.nn.Module):
            not_hidden.update(id(p) for p in module.parameters())
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() == 2 and id(p) not in not_hidden:
            muon.append((name, p, _conv1d_lr_factor(p) if isinstance(owner[id(p)], Conv1D)
                         else 1.0))
        else:
            adamw.append((name, p))
    return muon, adamw


def _conv1d_lr_factor(weight: torch.Tensor) -> float:
    n_in, n_out = weight.shape  # torch's Muon reads (rows, cols) as (out, in)
    return math.sqrt(max(1.0, n_out / n_in)) / math.sqrt(max(1.0, n_in / n_out))


def build_muon(model: torch.nn.Module, config: TrainConfig,
               orthogonalise_in: torch.dtype = torch.bfloat16) -> MuonWithAdamW:
    muon, adamw = muon_split(model)
    if not muon:
        raise HftrainError("train.optimizer muon found no 2-D hidden weight matrices to train "
                           "in this model; choose another train.optimizer")
    factors = sorted({factor for _, _, factor in muon})
    # The recipe checks muon_lr x muon_weight_decay < 1; GPT-2's c_fc steps at 2 x muon_lr.
    shrink = config.muon_lr * factors[-1] * config.muon_weight_decay
    if shrink >= 1:
        raise HftrainError(
            f"train.muon_weight_decay x muon_lr x {factors[-1]:.3g} (this model's largest Muon "
            f"rate factor) is {shrink:g}: Muon multiplies those matrices by 1 - that each "
            "step, which must stay above 0; lower train.muon_weight_decay")
    muon_groups = [{"params": [p for _, p, f in muon if f == factor],
                    "lr": config.muon_lr * factor} for factor in factors]
    adamw_groups = [
        {"params": [p for _, p in adamw if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for _, p in adamw if p.dim() < 2], "weight_decay": 0.0},
    ]
    parts: dict[str, torch.optim.Optimizer] = {}
    adamw_groups = [g for g in adamw_groups if g["params"]]
    if adamw_groups:  # LoRA may train nothing but 2-D adapter matrices
        parts["adamw"] = torch.optim.AdamW(adamw_groups, lr=config.lr,
                                           betas=(config.beta1, config.beta2),
                                           fused=_fused(model))
    parts["muon"] = Muon(muon_groups, lr=config.muon_lr, momentum=config.muon_momentum,
                         nesterov=True, weight_decay=config.muon_weight_decay,
                         orthogonalise_in=orthogonalise_in)
    return MuonWithAdamW(parts, lr=config.lr)


def loss_of(closure: Callable[[], Any] | None) -> Any:
    """torch's optimizer convention: a closure, if given, recomputes the loss with grad on."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class Muon(torch.optim.Muon):
    """torch's Muon (its parameter groups, defaults, state and algorithm), with an update
    written here for two reasons torch's `step` cannot serve:

    - Precision: torch's Newton-Schulz iteration casts each update to bf16, right where bf16
      products are native (GPUs; CPUs with AMX or avx512_bf16) and 80x slower where they
      are emulated (an AVX2-only CPU): the Muon recipes were the slowest of all there. This
      one orthogonalises in `orthogonalise_in`, which `build_optimizer` sets to bf16 only
      where it is native (`hftrain.launch.bf16_is_native`), fp32 elsewhere.
    - Speed: torch iterates matrix by matrix, 15 small products each; the matrices of one
      shape (every layer's query projection, say) are iterated together here, as batched
      products (as modded-nanogpt does): the Muon step of the 4-layer Shakespeare Qwen3
      took 14-15 ms one by one and a third of that batched (2 CPU threads).

    Everything else is torch's: coefficients, momentum with Nesterov, decoupled weight decay,
    the 'original' learning-rate adjustment, and the `momentum_buffer` state, so a checkpoint
    does not depend on the precision. Sharded matrices (FSDP2's DTensors) are iterated one by
    one, as DTensors, as torch's step does.
    """

    def __init__(self, params: Any, *, orthogonalise_in: torch.dtype = torch.bfloat16,
                 **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.orthogonalise_in = orthogonalise_in

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = loss_of(closure)
        for group in self.param_groups:
            if group["adjust_lr_fn"] not in (None, "original"):
                raise ValueError(f"adjust_lr_fn {group['adjust_lr_fn']!r} is torch's own; "
                                 "this Muon adjusts as 'original' only")
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            buffers: list[torch.Tensor] = []
            self._init_group(group, params, grads, buffers)
            momentum = group["momentum"]
            updates = []
            for grad, buffer in zip(grads, buffers, strict=True):
                buffer.lerp_(grad, 1 - momentum)
                updates.append(grad.lerp(buffer, momentum) if group["nesterov"] else buffer)
            for members in _alike(params):
                orthogonal = self._orthogonalised([updates[i] for i in members], group)
                for i, update in zip(members, orthogonal, strict=True):
                    param = params[i]
                    rows, cols = param.shape[:2]
                    param.mul_(1 - group["lr"] * group["weight_decay"])
                    param.add_(update.to(param.dtype),
                               alpha=-group["lr"] * math.sqrt(max(1, rows / cols)))
        return loss

    def _orthogonalised(self, updates: list[torch.Tensor], group: dict) -> list[torch.Tensor]:
        """`updates` (one shape) orthogonalised, as one batch where there are several."""
        settings = (group["ns_coefficients"], group["ns_steps"], group["eps"],
                    self.orthogonalise_in)
        if len(updates) == 1:
            return [newton_schulz(updates[0], *settings)]
        return list(newton_schulz(torch.stack(updates), *settings).unbind(0))


def _alike(params: list[torch.Tensor]) -> list[list[int]]:
    """Indices of `params` in groups that can be iterated as one batch: plain tensors of one
    shape and dtype together; a DTensor (sharded) alone."""
    groups: dict[Any, list[int]] = {}
    for i, param in enumerate(params):
        key = i if hasattr(param, "placements") else (tuple(param.shape), param.dtype)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def newton_schulz(matrices: torch.Tensor, coefficients: tuple[float, float, float],
                  steps: int, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """torch's quintic Newton-Schulz orthogonalisation (`torch.optim._muon`), in `dtype`, of
    one matrix or a batch of them (..., rows, cols), each scaled by its own norm."""
    a, b, c = coefficients
    x = matrices.to(dtype)
    tall = matrices.size(-2) > matrices.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    multiply_add = torch.baddbmm if x.dim() == 3 else torch.addmm
    for _ in range(steps):
        gram = x @ x.mT
        x = multiply_add(x, multiply_add(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer made of torch's Muon and AdamW, each stepping its own parameter groups.

    Why one object: Accelerate prepares, checkpoints (`save_state` / `load_state`) and scales
    (fp16's GradScaler) one optimizer per model, and the loop and the schedule step one; two
    optimizers side by side, as modded-nanogpt and nanochat's training scripts keep them (a
    list they loop over, saved one file each), would need a second path through all of that.

    How: the param groups and the state are this optimizer's own, as in any
    `torch.optim.Optimizer` (AdamW's groups first, then Muon's, each tagged with `"part"`), and
    the parts are views of them: each part's `param_groups` is the list of its tagged groups
    and its `state` this optimizer's `state` (keyed by parameter, so never shared between
    parts). Everything else is the base class's, unchanged: `state_dict()` is the standard
    layout of one optimizer over all groups, `load_state_dict()` the standard checks and
    casts, after which the views are pointed at the loaded groups again; `zero_grad()`;
    and the scheduler's `LambdaLR` multiplies every group's own initial lr by the same factor,
    so both parts follow the schedule from their own peak (`defaults["lr"]` is the AdamW
    part's, which `cosine_with_min_lr` reads: min_lr is a fraction of lr for both parts).
    `step()` steps each part with torch's own implementation.

    It does not support `found_inf` (no `_step_supports_amp_scaling`): the loop skips a step
    with a non-finite loss on the host, before `step()`.
    """

    def __init__(self, parts: dict[str, torch.optim.Optimizer], lr: float) -> None:
        groups = []
        for name, part in parts.items():
            for group in part.param_groups:  # filled with the part's defaults by the part
                group["part"] = name
                groups.append(group)
        super().__init__(groups, defaults={"lr": lr})
        self.parts = parts
        self._share()

    def _share(self) -> None:
        for name, part in self.parts.items():
            part.param_groups = [g for g in self.param_groups if g["part"] == name]
            part.state = self.state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # what `load_state_dict` ends with: new groups and state
        if "parts" in self.__dict__:
            self._share()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = loss_of(closure)
        self._share()  # cheap, and safe against anyone replacing param_groups or state
        for part in self.parts.values():
            part.step()
        return loss


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    """Warmup, then decay over `max_steps`; stepped once per optimizer step by the loop.
    Every param group's lr follows the schedule from its own peak (`LambdaLR`)."""
    extra = {"min_lr": config.min_lr} if config.scheduler == "cosine_with_min_lr" else None
    return get_scheduler(
        config.scheduler,
        optimizer,
        num_warmup_steps=config.warmup_steps,
        num_training_steps=config.max_steps,
        scheduler_specific_kwargs=extra,
    )
