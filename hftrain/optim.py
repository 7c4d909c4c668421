"""Optimizer with weight-decay parameter groups, and a `transformers` learning-rate schedule."""

from __future__ import annotations

import torch
from transformers import get_scheduler

from hftrain.recipe import TrainConfig


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings; never biases or norm scales (nanoGPT's rule: dim >= 2)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    device_type = next(model.parameters()).device.type
    return torch.optim.AdamW(
        groups,
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        # The fused kernel does the whole update in one op: ~10% of a small model's step on CPU.
        fused=device_type in ("cpu", "cuda"),
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    """Warmup, then decay over `max_steps`; stepped once per optimizer step by the loop."""
    extra = {"min_lr": config.min_lr} if config.scheduler == "cosine_with_min_lr" else None
    return get_scheduler(
        config.scheduler,
        optimizer,
        num_warmup_steps=config.warmup_steps,
        num_training_steps=config.max_steps,
        scheduler_specific_kwargs=extra,
    )
