"""One optimizer update from a step's micro-batches, apart from the loop around it.

`TrainStep` holds what an update needs (the prepared model, optimizer and schedule, the
recipe's clipping and statefulness) and nothing about logging, checkpoints or stopping, so a
test or a benchmark can take steps without a run: `TrainStep(accelerator, model, optimizer,
scheduler, recipe.train)(micro_batches)`.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from hftrain.data import IGNORE_INDEX
from hftrain.dpo import dpo_objective
from hftrain.evaluation import model_inputs, token_nll
from hftrain.models.recurrent.modeling_recurrent import recurrent_cache
from hftrain.recipe import TrainConfig
from hftrain.sharding import bare_model

Recurrent = tuple[torch.Tensor, ...] | None


class StepResult(NamedTuple):
    loss: torch.Tensor
    """The step's mean token loss (a device tensor: reading it waits for the device)."""
    finite: torch.Tensor
    """Whether that loss is finite on every process (a device tensor)."""
    tokens: int
    """Tokens the step processed, all processes together."""
    recurrent: Recurrent
    """The recurrent state the next step carries on from (stateful training), else None."""
    stats: torch.Tensor | None = None
    """This process's share of the step's means of the objective's figures (DPO: its
    `STAT_NAMES`), a device tensor; None for language modelling."""


class TrainStep:
    """One update from several micro-batches; `__call__` returns a `StepResult`.

    The loss of each micro-batch is its summed token NLL divided by the target tokens of the
    *whole* step (all micro-batches, all processes), so uneven counts (padding, masked labels)
    weigh every token equally; with DPO (`objective`), its pairs' summed loss divided by the
    step's pairs. DDP averages gradients over processes, hence the factor
    `num_processes`. In stateful training each micro-batch continues the lanes of the one
    before, starting from its (detached) final state.

    A step whose loss is not finite changes neither the weights nor the optimizer state: a
    fused torch optimizer skips it on the device (`found_inf`, no wait for the host), the
    others are not stepped once the host has read the check, and fp16's GradScaler skips it
    itself. The schedule advances either way, so step N always runs at the schedule's rate
    for step N.
    """

    def __init__(self, accelerator: Accelerator, model: Any, optimizer: Any, scheduler: Any,
                 train: TrainConfig) -> None:
        self.accelerator = accelerator
        self.objective = dpo_objective(train, bare_model(accelerator, model), accelerator)
        """The loss of a micro-batch other than language modelling's (DPO: its reference is
        the model as it is now, so a `TrainStep` is made before a checkpoint is loaded),
        else None."""
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.grad_clip = train.grad_clip
        self.stateful = train.stateful
        self.skip_on_device = skips_on_device(optimizer, accelerator)
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        self.backward_options = {"scale_wrt_gas": False} if self.deepspeed else {}
        """The loss is already divided by the step's target tokens (all micro-batches):
        DeepSpeed must not divide it by the accumulation steps again."""

    def __call__(self, micro_batches: list[dict[str, torch.Tensor]],
                 recurrent: Recurrent = None) -> StepResult:
        acc = self.accelerator
        n_targets = sum(self._targets(b) for b in micro_batches)  # on the device: no wait
        if acc.num_processes > 1:
            n_targets = acc.reduce(n_targets, "sum")
        n_targets = n_targets.clamp(min=1)
        step_loss = torch.zeros((), device=acc.device)
        stats = None
        for i, batch in enumerate(micro_batches):
            if batch.get("reset_state"):
                recurrent = None
            with self._accumulating(last=i == len(micro_batches) - 1):
                if self.objective is None:
                    out = self.model(**model_inputs(batch, acc.device),
                                     **self._carried(recurrent))
                    if self.stateful:
                        recurrent = tuple(s.detach() for s in recurrent_cache(out))
                    labels = batch["labels"].to(acc.device, non_blocking=True)
                    loss = token_nll(out.logits, labels).sum() / n_targets
                else:  # the pairs' summed loss and reward figures
                    loss_sum, pair_stats = self.objective(self.model, batch)
                    loss = loss_sum / n_targets
                    stats = pair_stats / n_targets + (0 if stats is None else stats)
                acc.backward(loss * acc.num_processes, **self.backward_options)
            step_loss += loss.detach()
        n_tokens = sum(b["input_ids"].numel() for b in micro_batches) * acc.num_processes
        finite = self._finite(step_loss)
        if self.grad_clip > 0:
            acc.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if self.skip_on_device:  # the fused kernel leaves weights and moments as they are
            inner_optimizer(self.optimizer).found_inf = (~finite).float()
            self.optimizer.step()
        elif acc.scaler is not None or bool(finite):  # fp16: the GradScaler skips non-finite
            self.optimizer.step()  # gradients itself; otherwise wait for the check
        self.scheduler.step()  # every step, skipped or not (a NaN, fp16's loss-scale skip)
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(step_loss, finite, n_tokens, recurrent if self.stateful else None,
                          stats)

    def _targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What a micro-batch's loss is a sum over: scored tokens, or (DPO) pairs."""
        if self.objective is not None:
            return self.objective.count(batch)
        labels = batch["labels"].to(self.accelerator.device, non_blocking=True)
        return (labels != IGNORE_INDEX).sum()

    def _carried(self, recurrent: Recurrent) -> dict[str, Any]:
        """The recurrent state carried into a stateful forward; no cache built otherwise."""
        return {"cache": recurrent, "use_cache": True} if self.stateful else {"use_cache": False}

    def _accumulating(self, last: bool) -> Any:
        """The context of one micro-batch's forward and backward. DDP: no gradient sync but
        for the last. DeepSpeed: Accelerate's `accumulate`, which marks the last micro-batch
        as the accumulation boundary, where the engine reduces, clips (`train.grad_clip`)
        and steps, skipping a step whose gradient norm is not finite."""
        if self.deepspeed:
            return self.accelerator.accumulate(self.model)
        return nullcontext() if last else self.accelerator.no_sync(self.model)

    def _finite(self, step_loss: torch.Tensor) -> torch.Tensor:
        """Whether the step's loss is finite on every process (a device tensor). With
        `on_nan: stop` the run stops at the next log line, having skipped the step."""
        total = step_loss
        if self.accelerator.num_processes > 1:  # every rank must take the same decision
            total = self.accelerator.reduce(total.clone(), "sum")
        return torch.isfinite(total)


def inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def skips_on_device(optimizer: Any, accelerator: Accelerator) -> bool:
    """Whether a step can be skipped on the device: a fused torch optimizer reads `found_inf`
    (as under `GradScaler`), unless a GradScaler (fp16) already drives it."""
    inner = inner_optimizer(optimizer)
    fused = any(group.get("fused") for group in inner.param_groups)
    return fused and getattr(inner, "_step_supports_amp_scaling", False) \
        and getattr(accelerator, "scaler", None) is None
