"""A run from top to bottom: `train(recipe)` sets up, `fit(run, stop)` is the loop, and
`hftrain.finish` evaluates, exports and samples.

Order matters for "bad input loses nothing": what to do with the run folder is decided
(`RunFolder.plan`), the tokenizer is built, the first batches are pulled from both data splits
and the model, optimizer and schedule are built (`build.build_parts`) *before* the run folder
is written (`RunFolder.start`), so a missing file, an empty corpus, an over-long block or a bad
setting fails with nothing written.

And for "a run is never lost after its first step": once the folder is started, a failure
during training leaves a checkpoint of the last completed step (one process; with several,
the newest interval checkpoint), and the run is checkpointed at its last step before the final
evaluation, export, sample and push, so `--resume` redoes only what is missing.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from hftrain.build import RunParts, build_parts, print_global_batch
from hftrain.errors import ResumableError, TrainingDiverged
from hftrain.finish import finish
from hftrain.harness import task_scorer
from hftrain.lifecycle import RunFolder
from hftrain.nodes import (
    builds_token_cache,
    check_same_recipe,
    check_shared,
    on_every_process,
    on_main_process,
)
from hftrain.process import set_up_process
from hftrain.recipe import Recipe, check
from hftrain.resume import Plan
from hftrain.signals import StopRequest
from hftrain.tracking import default_trackers, flat_config, progress_bar, val_summary
from hftrain.train_state import Run


@dataclass(kw_only=True)
class TrainResult:
    run_dir: Path
    model: Any = None
    """The trained model, unwrapped from Accelerate, in eval mode (None if nothing ran)."""
    final_dir: Path | None = None
    val: dict[str, Any] = field(default_factory=dict)
    """The final evaluation's figures (empty if it did not run)."""
    sample: str = ""
    train_seconds: float = 0.0
    step: int = 0
    steps_run: int = 0
    """Optimizer steps this call made (fewer than `step` after a resume)."""
    interrupted: int = 0
    """The signal (SIGTERM, SIGINT) that stopped the run early after a checkpoint; 0 if none."""
    checkpoint: Path | None = None
    already_finished: bool = False
    """`--resume` found the run finished at its max_steps: nothing was done."""

    def validation_line(self) -> str:
        """The final evaluation in one line (each source's loss and each task's metrics
        too)."""
        val = self.val
        dpo = "pairs" in val  # the loss is DPO's; the perplexity, the chosen completions'
        return (f"validation: {'DPO loss' if dpo else 'loss'} {val['loss']:.4f} | "
                f"{'chosen ' if dpo else ''}perplexity {val['perplexity']:.3f} | "
                f"bits/byte {val['bits_per_byte']:.4f} | {val['tokens']:,} tokens"
                f"{val_summary(val)}")


def train(recipe: Recipe, recipe_path: Path | None = None) -> TrainResult:
    """Run a recipe end to end: tokenizer, data, model, training, evaluation, export, sample.

    `recipe_path` is the file the recipe came from, which the run folder must not contain.
    Bad input found before the run folder is written raises an HftrainError; a failure after
    a checkpoint raises a ResumableError holding it and the checkpoint `--resume` starts from.
    """
    check(recipe, str(recipe_path or "<recipe>"))
    trackers = default_trackers() if recipe.run.trackers is None else recipe.run.trackers
    accelerator = set_up_process(recipe, recipe_path, trackers)
    recipe = with_token_budget(recipe, accelerator)
    with RunFolder(recipe, recipe_path, accelerator.is_main_process) as folder:
        folder.check_target()
        check_same_recipe(accelerator, recipe.to_dict())  # each node's agent has its own command
        check_shared(accelerator, {"run.output_dir": folder.path})  # rank 0 writes, all read
        builds_cache = False
        if recipe.data.cache:  # a stale cache is rebuilt in place: never over the data
            on_every_process(accelerator, folder.check_cache_target)
            builds_cache = builds_token_cache(accelerator, Path(recipe.data.cache))
        plan = on_main_process(accelerator, lambda: folder.plan(accelerator))
        if plan.finished:
            return TrainResult(run_dir=folder.path, final_dir=folder.path / "final",
                               step=recipe.train.max_steps, already_finished=True)
        parts = build_parts(recipe, accelerator, recipe_path, builds_cache)
        tasks = task_scorer(recipe, accelerator)  # lm-eval's tasks checked before any write
        on_main_process(accelerator, lambda: folder.start(plan, parts.tokenizer,
                                                          parts.tokenizer_built))
        if trackers:
            accelerator.init_trackers("hftrain", config=flat_config(recipe.to_dict()))
        return train_in_folder(Run(recipe, accelerator, parts, folder.path, tasks), folder,
                               plan, parts)


def with_token_budget(recipe: Recipe, accelerator: Accelerator) -> Recipe:
    """The recipe with `train.max_steps` derived from `train.max_tokens` (if set) for this
    launch's number of processes: the schedule, the loop, resume and the export use it."""
    cfg, processes = recipe.train, accelerator.num_processes
    if cfg.max_tokens is None:
        return recipe
    steps = cfg.steps_for_tokens(processes, recipe.data.block_size)
    accelerator.print(f"train.max_tokens {cfg.max_tokens:,}: {steps:,} steps of "
                      f"{cfg.global_batch(processes) * recipe.data.block_size:,} token positions")
    return replace(recipe, train=replace(cfg, max_steps=steps))


def train_in_folder(run: Run, folder: RunFolder, plan: Plan, parts: RunParts) -> TrainResult:
    """Under the lock, with every input checked and the folder started: resume or start,
    train, finish. A failure with a checkpoint to go on from raises a ResumableError."""
    accelerator = run.accelerator
    if plan.checkpoint is not None:
        run.checkpoints.load(plan.checkpoint)
        accelerator.print(f"resumed from {plan.checkpoint} at step {run.step}")
    elif plan.restart:
        run.metrics.truncate(0)
        accelerator.print(f"{folder.path} has no checkpoint: training starts again at step 0")
    print_global_batch(accelerator, run.recipe, parts.first_batch)
    with StopRequest() as stop:
        try:
            first_step, started = run.step, time.perf_counter()
            fit(run, stop)
            result = TrainResult(run_dir=folder.path, step=run.step,
                                 train_seconds=time.perf_counter() - started,
                                 steps_run=run.step - first_step, interrupted=run.interrupted,
                                 checkpoint=run.checkpoints.latest)
            if run.interrupted:
                result.model = run.bare_model().eval()
            else:
                result.final_dir = folder.path / "final"
                result.val, result.model, result.sample = finish(run, folder, stop)
            return result
        except Exception as exc:  # the CLI tells how to resume from the newest checkpoint
            newest = run.checkpoints.settle()
            if newest is not None and not run.finished:  # once exported, nothing to resume
                raise ResumableError(exc, newest) from exc
            raise
        finally:  # no checkpoint is left completing once the run folder's lock is let go
            run.checkpoints.settle()
            accelerator.end_training()  # close the trackers however the run ended


def fit(run: Run, stop: StopRequest) -> None:
    """Train to `train.max_steps`, or until `stop` asks (then `run.interrupted` says which
    signal); either way the last step is checkpointed.

    If a step fails (bad data, a data file deleted, a full disk), the last completed step is
    checkpointed before the error goes on, so fixing the cause and `--resume` loses nothing.
    Between log lines the loop never waits for the device: the loss and the finite-loss
    check stay on it (`TrainState`), and a non-finite step is skipped there (`TrainStep`).
    """
    cfg, state, batches = run.recipe.train, run.state, run.state.data
    run.model.train()
    try:
        with progress_bar(cfg.max_steps, run.accelerator.is_main_process) as bar:
            bar.update(state.step)  # a resumed run starts part-way
            run.log.restart()
            while state.step < cfg.max_steps:
                waited = time.perf_counter()
                batches.begin_step()
                micro_batches = [next(batches) for _ in range(cfg.grad_accum_steps)]
                run.log.data_wait += time.perf_counter() - waited
                lr = run.scheduler.get_last_lr()[0]
                run.updating = True  # a failure from here to the end of the update: no
                step = run.optimizer_step(micro_batches)  # half-updated checkpoint
                run.updating = False
                state.add_step(step.loss, step.finite, step.tokens, len(micro_batches),
                               step.stats)
                batches.end_step()
                bar.update(1)
                log_step = state.step % cfg.log_interval == 0 or state.step == cfg.max_steps
                if log_step:
                    log_window(run, bar, lr)
                if state.step % run.recipe.eval.interval == 0 and state.step < cfg.max_steps:
                    val = run.evaluate(run.recipe.eval.max_batches)
                    bar.write(f"step {state.step}: val_loss {val['loss']:.4f} "
                              f"val_ppl {val['perplexity']:.3f}{val_summary(val)}")
                    run.log.restart()
                if run.checkpoints.after_step(state.step, stop.signum, log_step):
                    run.interrupted = stop.signum or signal.SIGTERM
                    break
    except Exception as exc:
        run.checkpoints.after_failure(state.step, exc, batches, run.updating)
        raise
    finally:
        batches.close()  # stop the data workers
    run.checkpoints.settle()  # a checkpoint completing in the background, first
    if not run.checkpoints.holds(state.step):
        run.checkpoints.save(state.step)


def log_window(run: Run, bar: Any, lr: float) -> None:
    """The log line: the mean loss of the steps since the last one, written and shown; with
    `train.on_nan: stop`, a window with a non-finite step stops the run instead."""
    record, (skipped, first, window) = run.log.close(run.state, lr)
    if skipped and run.recipe.train.on_nan == "stop":
        newest = run.checkpoints.settle()
        kept = f"the newest checkpoint is {newest}" if newest else "no checkpoint was saved"
        raise TrainingDiverged(
            f"the training loss was not finite at step {first} ({skipped} of the {window} "
            f"steps up to step {run.step}); those steps did not update the model ({kept}). "
            "Lower train.lr in a new run, or --resume with train.on_nan=skip")
    run.log.write(record, bar)

