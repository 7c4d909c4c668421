"""Direct Preference Optimization (Rafailov et al., 2023): the sigmoid loss of TRL's
`DPOTrainer`, on the pairs of `data.kind: preference` (`hftrain.preference`).

    loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen))
                                - (log pi(rejected) - log ref(rejected))))

where log pi(y) is the sum of the log-probabilities of a completion's scored tokens (its EOS
included, the prompt and padding not). The reference is the starting model: a frozen copy of
`model.init_from`, or, with LoRA, the trained model with its adapters disabled (no second
copy of the weights). `beta * (log pi - log ref)` is a side's implicit reward; logged as
TRL logs them: `rewards/chosen`, `rewards/rejected`, `rewards/accuracies` (the share of pairs
whose chosen reward is higher) and `rewards/margins`.

Why not TRL's trainer: it is a `transformers.Trainer`, with its own loop, data collation and
checkpoints, and a run here is hftrain's loop, streams and exact resume; the loss itself is
a few lines, and a test checks that it equals `DPOTrainer`'s on the same batch to 1e-5.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from hftrain.errors import HftrainError
from hftrain.evaluation import perplexity_metric
from hftrain.recipe import TrainConfig
from hftrain.sft import IGNORE_INDEX

STAT_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
"""The per-pair figures a DPO step logs (means over the step's pairs)."""


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's summed log-probability of its scored labels, in float32."""
    nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                          ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.view(labels.shape).sum(-1)


def pair_logps(model: Any, batch: dict[str, torch.Tensor], device: Any) -> torch.Tensor:
    """(2, pairs): the chosen and the rejected sides' log-probabilities, both sides in one
    forward (right-padded, so padding never reaches a scored position)."""
    ids = torch.cat([batch["input_ids"], batch["rejected_input_ids"]]).to(device)
    labels = torch.cat([batch["labels"], batch["rejected_labels"]]).to(device)
    logits = model(input_ids=ids, use_cache=False).logits
    return sequence_logps(logits, labels).view(2, -1)


def dpo_losses(policy: torch.Tensor, reference: torch.Tensor,
               beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair's loss, and its (2, pairs) rewards: beta x the log-ratio of each side."""
    rewards = beta * (policy - reference)
    return -F.logsigmoid(rewards[0] - rewards[1]), rewards.detach()


def real_pairs(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Which rows of a batch hold a pair with a scored token (not a partial batch's padding,
    nor a pair whose completions were cut off entirely by the block size)."""
    return ((batch["labels"] != IGNORE_INDEX).any(-1)
            | (batch["rejected_labels"] != IGNORE_INDEX).any(-1))


class DPOObjective:
    """The loss of a training step's micro-batches (`train_step.TrainStep`): each micro-batch
    gives its pairs' summed loss and summed reward figures (`STAT_NAMES`).

    Also a checkpoint part: the reference's weights by content. A resume rebuilds the
    reference from `model.init_from` as it is then; an export re-written in that folder since
    (a re-run SFT) would silently tune towards another model, so it is refused."""

    stat_names = STAT_NAMES

    def __init__(self, reference: Any | None, beta: float, accelerator: Any,
                 adapted: Any = None) -> None:
        self.reference, self.beta, self.accelerator = reference, beta, accelerator
        self.adapted = adapted
        """With LoRA (no `reference`): the model whose base weights are the reference."""
        self._digest: str | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"reference_sha256": self.reference_digest()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("reference_sha256") not in (None, self.reference_digest()):
            raise HftrainError(
                "the reference model (model.init_from) is not the one this run started from: "
                "its weights changed since the checkpoint; restore that export, or start a "
                "new run from this one")

    def reference_digest(self) -> str:
        """SHA-256 of the reference's weights (with LoRA: the base weights, not the
        adapters), computed once."""
        if self._digest is None:
            model = self.reference if self.reference is not None else self.adapted
            digest = hashlib.sha256()
            for name, tensor in sorted(model.state_dict().items()):
                if "lora_" not in name:
                    digest.update(name.encode())
                    digest.update(tensor.detach().cpu().contiguous().view(-1)
                                  .view(torch.uint8).numpy().tobytes())
            self._digest = digest.hexdigest()
        return self._digest

    def evaluate(self, model: Any, batches: Any, max_batches: int | None) -> dict[str, float]:
        """The held-out pairs' figures (`evaluate_preferences`)."""
        return evaluate_preferences(model, self, batches, self.accelerator, max_batches)

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The pairs a micro-batch trains on (on the device)."""
        return real_pairs(batch).to(self.accelerator.device).sum()

    def __call__(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
        device = self.accelerator.device
        policy = pair_logps(model, batch, device)
        losses, rewards = dpo_losses(policy, self.reference_logps(model, batch), self.beta)
        real = real_pairs(batch).to(device)
        chosen, rejected = rewards
        stats = torch.stack([chosen, rejected, (chosen > rejected).float(), chosen - rejected])
        return losses[real].sum(), stats[:, real].sum(-1)

    @torch.no_grad()
    def reference_logps(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reference's (2, pairs) log-probabilities, in eval mode (no dropout)."""
        device = self.accelerator.device
        with self.accelerator.autocast():
            if self.reference is not None:
                return pair_logps(self.reference, batch, device)
            bare = self.accelerator.unwrap_model(model)
            with bare.disable_adapter(), eval_mode(bare):
                return pair_logps(bare, batch, device)


@contextmanager
def eval_mode(model: Any) -> Any:
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def dpo_objective(train: TrainConfig, model: Any, accelerator: Any) -> DPOObjective | None:
    """`train.objective: dpo`'s loss, its reference made from `model` (the bare model as
    loaded from `model.init_from`: called before any step, and before a checkpoint is
    loaded): a frozen copy, or none with LoRA (the model itself, adapters disabled)."""
    if train.objective != "dpo":
        return None
    if hasattr(model, "disable_adapter"):  # a PEFT model
        return DPOObjective(None, train.dpo_beta, accelerator, adapted=model)
    import copy

    reference = copy.deepcopy(model).eval().requires_grad_(False)
    return DPOObjective(reference, train.dpo_beta, accelerator)


@torch.no_grad()
def evaluate_preferences(model: Any, objective: DPOObjective, batches: Any, accelerator: Any,
                         max_batches: int | None = None) -> dict[str, float]:
    """Held-out pairs: the DPO loss (`loss`), the reward accuracy and margin, and the share of
    pairs the model itself prefers the chosen side of (`preference_accuracy`: its log-
    probability is higher; `reference_preference_accuracy`: the reference's, i.e. before
    tuning), with the perplexity and bits per byte of the chosen completions."""
    import itertools

    device = accelerator.device
    sums = torch.zeros(9, dtype=torch.float64, device=device)
    with eval_mode(model):
        for batch in itertools.islice(batches, max_batches):
            with accelerator.autocast():
                policy = pair_logps(model, batch, device)
            reference = objective.reference_logps(model, batch)
            losses, rewards = dpo_losses(policy, reference, objective.beta)
            real = real_pairs(batch).to(device)
            scored = batch["labels"].to(device) != IGNORE_INDEX
            sums += torch.stack([
                -policy[0][real].sum(), scored.sum(), batch["byte_counts"].to(device)[scored].sum(),
                losses[real].sum(), real.sum(),
                (rewards[0] > rewards[1])[real].sum(), (rewards[0] - rewards[1])[real].sum(),
                (policy[0] > policy[1])[real].sum(), (reference[0] > reference[1])[real].sum(),
            ]).double()
    (nll, tokens, n_bytes, loss, pairs, reward_right, margin, right,
     reference_right) = accelerator.reduce(sums, reduction="sum").tolist()
    chosen = perplexity_metric().compute(nll_sum=[nll], token_count=[int(tokens)],
                                         byte_count=[int(n_bytes)])
    per_pair = max(pairs, 1)
    return {**chosen, "chosen_loss": chosen["loss"], "loss": loss / per_pair,
            "pairs": int(pairs), "reward_accuracy": reward_right / per_pair,
            "reward_margin": margin / per_pair, "preference_accuracy": right / per_pair,
            "reference_preference_accuracy": reference_right / per_pair}
