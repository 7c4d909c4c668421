"""The live run as one object (`Run`: what `train.fit` loops over), and its resumable state as
parts (`checkpoint.Checkpointer`): the loop's counters, the current log window and the
recurrent state carried across windows (`TrainState`); the data position (the training
stream's own); the data files' fingerprints, which a resume compares with the files as they
are (`DataFiles`); and the tokenizer, which a resume requires to be the same
(`TokenizerIdentity`).

The log window's sums stay on the device between log lines (`window_loss`,
`window_steps`, `window_skipped`): adding to them never waits for the device, and reading
them once per log line is the loop's only host-device synchronisation between checkpoints.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hftrain.checkpoint import COUNTERS
from hftrain.checkpoint_policy import RunCheckpoints
from hftrain.data_check import content_sample, describe_change
from hftrain.errors import HftrainError
from hftrain.evaluation import evaluate_lm, perplexity_metric
from hftrain.harness import TASK_WAIT, TaskScorer
from hftrain.nodes import on_main_process_within
from hftrain.sharding import bare_model, is_sharded
from hftrain.tracking import MetricsLog, WindowLog, flops_per_token, peak_tflops
from hftrain.train_step import StepResult, TrainStep

if TYPE_CHECKING:
    from hftrain.build import RunParts
    from hftrain.recipe import Recipe


class Run:
    """The live run: its parts as built (`build.RunParts`), the counters and log window
    (`state`), the metrics log, the checkpoints and the step (`TrainStep`). Everything a
    resume must restore is one `Checkpointer` of parts (`checkpoints`); the model, optimizer
    and RNG states are Accelerate's, which it saves through `save_state`."""

    def __init__(self, recipe: Recipe, accelerator: Any, parts: RunParts,
                 run_dir: Path | None, tasks: TaskScorer | None = None) -> None:
        self.recipe, self.accelerator = recipe, accelerator
        self.tasks = tasks
        """`eval.tasks`' scorer, on the main process (`harness.task_scorer`)."""
        self.model, self.scheduler = parts.model, parts.scheduler
        self.streams, self.tokenizer = parts.streams, parts.tokenizer
        self.state = TrainState(parts.batches, accelerator.device)
        self.metrics = MetricsLog(run_dir / "metrics.jsonl" if run_dir else None,
                                  accelerator.is_main_process, accelerator)
        self.train_step = TrainStep(accelerator, self.model, parts.optimizer, self.scheduler,
                                    recipe.train)
        self.objective = self.train_step.objective
        """DPO's loss and reference (`dpo.DPOObjective`); None for language modelling."""
        self.log = WindowLog(self.metrics, accelerator,
                             flops_per_token(bare_model(accelerator, self.model),
                                             recipe.data.block_size),
                             peak_tflops(recipe.train.peak_tflops),
                             self.objective.stat_names if self.objective else ())
        self.checkpoints = RunCheckpoints(accelerator, recipe, run_dir, {
            "loop": self.state, "data": parts.batches, "scheduler": parts.scheduler,
            "metrics": self.metrics,
            "data_files": DataFiles(parts.streams.fingerprints, accelerator.is_main_process),
            "tokenizer": TokenizerIdentity(parts.tokenizer),
            **({"objective": self.objective} if self.objective else {})})
        self.updating = False
        """Inside an optimizer step: weights or optimizer state may be part-way updated, so a
        failure here is not followed by a checkpoint."""
        self.interrupted = 0
        """The signal that stopped the run after a checkpoint (0: none)."""
        self.finished = False
        """Exported and marked finished: a later failure (sample, push) leaves nothing to
        resume."""

    @property
    def step(self) -> int:
        return self.state.step

    def bare_model(self) -> Any:
        """The model without Accelerate's wrappers (DDP, FSDP, torch.compile)."""
        return bare_model(self.accelerator, self.model)

    def optimizer_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        """One update (`TrainStep`), carrying the recurrent state from step to step."""
        result = self.train_step(micro_batches, self.state.recurrent)
        self.state.recurrent = result.recurrent
        return result

    def evaluate(self, max_batches: int | None) -> dict[str, Any]:
        """Validation loss, perplexity and bits per byte of the live model, logged; for a
        mixture, of each source (`val_loss/NAME`, up to `max_batches` each; returned as
        `by_source`) and of all their tokens together (`val_loss`)."""
        # Unwrapped: ranks may hold unequal numbers of validation batches, and a DDP-wrapped
        # forward may wait on the other ranks; the sums are reduced once at the end instead.
        # A sharded model's forward needs every rank whatever the wrapper: they go in lockstep.
        if self.objective is not None:  # DPO: held-out pairs
            return self._evaluate_preferences(max_batches)
        scores = {name: evaluate_lm(bare_model(self.accelerator, self.model), batches,
                                    self.accelerator, max_batches,
                                    stateful=self.recipe.train.stateful,
                                    lockstep=is_sharded(self.accelerator))
                  for name, batches in self.streams.val_sources(
                      self.recipe.eval.batch_size).items()}
        val = scores[""] if "" in scores else perplexity_metric().compute(
            nll_sum=[s["nll"] for s in scores.values()],
            token_count=[s["tokens"] for s in scores.values()],
            byte_count=[s["bytes"] for s in scores.values()])
        record = {"step": self.step, "val_loss": val["loss"], "val_ppl": val["perplexity"],
                  "val_bpb": val["bits_per_byte"], "val_tokens": val["tokens"]}
        if "" not in scores:
            val["by_source"] = scores
            for name, score in scores.items():
                record.update({f"val_loss/{name}": score["loss"],
                               f"val_bpb/{name}": score["bits_per_byte"],
                               f"val_tokens/{name}": score["tokens"]})
        if self.recipe.eval.tasks:
            started = time.perf_counter()
            val["tasks"] = self.score_tasks()
            record.update({f"task/{task}/{metric}": value
                           for task, metrics in val["tasks"].items()
                           for metric, value in metrics.items()})
            record["task_seconds"] = round(time.perf_counter() - started, 3)
        self.metrics.write(record)
        return val

    def _evaluate_preferences(self, max_batches: int | None) -> dict[str, Any]:
        batches = self.streams.val_batches(self.recipe.eval.batch_size)
        val = self.objective.evaluate(self.bare_model(), batches, max_batches)
        self.metrics.write({
            "step": self.step, "val_loss": val["loss"], "val_ppl": val["perplexity"],
            "val_bpb": val["bits_per_byte"], "val_tokens": val["tokens"],
            "val_pairs": val["pairs"], "val_reward_acc": val["reward_accuracy"],
            "val_margin": val["reward_margin"], "val_pref_acc": val["preference_accuracy"],
            "val_ref_pref_acc": val["reference_preference_accuracy"]})
        return val

    def score_tasks(self) -> dict[str, dict[str, float]]:
        """`eval.tasks` on the live model, scored by the main process (the others wait up
        to `harness.TASK_WAIT`): lm-eval's {task: {metric: value}}."""
        return on_main_process_within(
            self.accelerator, lambda: self.tasks.score_model(self.bare_model(), self.tokenizer),
            TASK_WAIT)


class TrainState:
    """Counters, log window and recurrent state of one process, and its training stream."""

    def __init__(self, data: Any, device: torch.device) -> None:
        self.data = data
        """The training stream (a checkpoint part of its own: `state_dict()` /
        `load_state_dict()` give its exact position)."""
        self.step = 0
        self.tokens_seen = 0
        self.micro_batches = 0
        """Micro-batches consumed from the training stream (step x grad_accum_steps)."""
        self.skipped_steps = 0
        """Steps whose update was skipped for a non-finite loss, up to the last log line."""
        self.window_tokens = 0
        self.window_loss = torch.zeros((), device=device)
        self.window_steps = torch.zeros((), dtype=torch.int64, device=device)
        """Steps of the window with a finite loss (those the mean loss is over)."""
        self.window_skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.window_first_skipped = torch.zeros((), dtype=torch.int64, device=device)
        """The first step of the window whose loss was not finite (0: none)."""
        self.window_stats: torch.Tensor | None = None
        """The objective's figures summed over the window's finite steps (DPO's rewards:
        `dpo.STAT_NAMES`); None for language modelling."""
        self.recurrent: tuple[torch.Tensor, ...] | None = None

    def add_step(self, loss: torch.Tensor, finite: torch.Tensor, n_tokens: int,
                 n_micro_batches: int, stats: torch.Tensor | None = None) -> None:
        """Count one optimizer step (on the device: no synchronisation)."""
        if stats is not None:
            kept = torch.where(finite, stats, torch.zeros_like(stats))
            self.window_stats = kept if self.window_stats is None else self.window_stats + kept
        self.step += 1
        self.micro_batches += n_micro_batches
        self.tokens_seen += n_tokens
        self.window_tokens += n_tokens
        self.window_loss += torch.where(finite, loss, torch.zeros_like(loss))
        self.window_steps += finite.long()
        self.window_skipped += (~finite).long()
        first = self.window_first_skipped
        self.window_first_skipped = torch.where((first == 0) & ~finite, self.step, first)

    def close_window(self) -> tuple[torch.Tensor, int, int, int]:
        """The window's summed loss (a device tensor), its finite steps, its skipped steps
        and the first of those (read from the device: one synchronisation); start a new
        window (`window_stats` is the caller's to read first)."""
        loss = self.window_loss.clone()
        counts = torch.stack([self.window_steps, self.window_skipped, self.window_first_skipped])
        steps, skipped, first_skipped = (int(n) for n in counts.tolist())
        self.skipped_steps += skipped
        for tensor in (self.window_loss, self.window_steps, self.window_skipped,
                       self.window_first_skipped,
                       *([self.window_stats] if self.window_stats is not None else [])):
            tensor.zero_()
        self.window_tokens = 0
        return loss, steps, skipped, first_skipped

    def state_dict(self) -> dict[str, Any]:
        """Counters (plain integers: the run's) and tensors (this process's: the log window,
        the recurrent state); the data position is a part of its own."""
        state: dict[str, Any] = {name: getattr(self, name) for name in COUNTERS}
        state.update(window_loss=self.window_loss, window_steps=self.window_steps,
                     window_skipped=self.window_skipped,
                     window_first_skipped=self.window_first_skipped)
        if self.window_stats is not None:
            state["window_stats"] = self.window_stats
        state.update({f"state_{i}": t for i, t in enumerate(self.recurrent or ())})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in COUNTERS:
            setattr(self, name, state[name])
        self.window_loss = state["window_loss"]
        self.window_steps = state["window_steps"]
        self.window_skipped = state["window_skipped"]
        self.window_first_skipped = state["window_first_skipped"]
        self.window_stats = state.get("window_stats")
        n_states = sum(1 for name in state if name.startswith("state_"))
        self.recurrent = tuple(state[f"state_{i}"] for i in range(n_states)) or None

    @staticmethod
    def merge_ranks(saved: list[dict[str, torch.Tensor]], rank: int) -> dict[str, torch.Tensor]:
        """This rank's tensors from a checkpoint saved by another number of processes (a
        token-cache run: `resume.plan_run` allows nothing else, and no recurrent state). The
        window's counts are the same on every saved rank; its loss is split over them, so
        rank 0 takes the sum and the others none."""
        total = sum(tensors["window_loss"] for tensors in saved)
        return {**saved[0], "window_loss": total if rank == 0 else torch.zeros_like(total)}


class DataFiles:
    """The data files' fingerprints (size, mtime) at the checkpoint: on resume, a file that
    changed since (a record fixed after the run stopped on it, or a corpus edited by mistake)
    is read as it is now, and the main process says so, once."""

    def __init__(self, fingerprints: dict[str, Any], is_main_process: bool) -> None:
        self.fingerprints, self.is_main_process = fingerprints, is_main_process
        self.samples = self._content_samples() if is_main_process else {}
        """Each file's `content_sample` by absolute path (main process: it writes the state
        file), taken at the start, while the files are as the run found them: a resume from
        files moved elsewhere with the same bytes recognises them by it."""

    def _content_samples(self) -> dict[str, str]:
        samples = {}
        for path in self.fingerprints:
            try:
                samples[os.path.abspath(path)] = content_sample(path)
            except OSError:  # gone already: the data stream says so when it reads it
                continue
        return samples

    def state_dict(self) -> dict[str, Any]:
        return {"files": {path: list(fp) for path, fp in self.fingerprints.items()},
                "samples": self.samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.is_main_process:
            return
        for path, then in (state.get("files") or {}).items():
            now = self.fingerprints.get(path)
            how = describe_change(then, now) if now is not None else None
            if how:
                print(f"hftrain: warning: data file {path} changed since the checkpoint ({how});"
                      " the resumed run reads it as it is now", file=sys.stderr)


class TokenizerIdentity:
    """The tokenizer the run trains with, by content (the SHA-256 of its full JSON): a resume
    with another one (the run's `tokenizer/` edited, an `init_from` folder re-trained with
    another vocabulary) would read the same ids as other text, so it is refused in one line.
    A checkpoint from before this part has none, and is not checked."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def state_dict(self) -> dict[str, Any]:
        return {"sha256": tokenizer_digest(self.tokenizer), "size": len(self.tokenizer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("sha256")
        if saved is not None and saved != tokenizer_digest(self.tokenizer):
            raise HftrainError(
                f"the tokenizer is not the one the run was trained with ({state.get('size')} "
                f"tokens then, {len(self.tokenizer)} now, and different content): its ids "
                "would mean other text. Restore the run's tokenizer, or start a new run")


def tokenizer_digest(tokenizer: Any) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
