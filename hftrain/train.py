"""The training run on Accelerate: check inputs, build, loop, evaluate, export.

Order matters for "bad input loses nothing": what to do with the run folder is decided, the
tokenizer is built, the first batches are pulled from both data splits and the model,
optimizer and schedule are built *before* the run folder is written, so a missing file, an
empty corpus, an over-long block or a bad setting fails with nothing written.

And for "a run is never lost after its first step": once the folder is started, a failure
during training leaves a checkpoint of the last completed step (one process; with several,
the newest interval checkpoint), and the run is checkpointed at its last step before the final
evaluation, export, sample and push, so `--resume` redoes only what is missing.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from hftrain.allocator import keep_freed_heap_memory
from hftrain.atomic import WRITE_ERRORS, write_error_reason
from hftrain.checkpoint import Checkpointer, CheckpointError
from hftrain.data import DataStreams
from hftrain.data import cache as token_cache
from hftrain.errors import (
    HftrainError,
    RecipeError,
    ReportedByMainProcess,
    ResumableError,
    RunStopped,
    TrainingDiverged,
    one_line,
)
from hftrain.evaluation import evaluate_lm
from hftrain.export import bare_model, export, generation_config
from hftrain.generation import generate_text
from hftrain.hub import push
from hftrain.launch import (
    check_sharding_before_start,
    check_sharding_set_up,
    launch_trajectory,
    precision_that_runs,
    report_setup,
)
from hftrain.memory import check_fits, model_sizes
from hftrain.models import (
    build_model,
    check_attention_available,
    check_attention_precision,
)
from hftrain.nodes import (
    build_once_per_filesystem,
    builds_token_cache,
    check_same_recipe,
    check_shared,
    on_every_process,
)
from hftrain.optim import build_optimizer, build_scheduler
from hftrain.recipe import Recipe, dump_recipe, expand_globs
from hftrain.resume import Plan, plan_run, trajectory
from hftrain.run_folder import (
    RunLock,
    check_new_run_target,
    check_replaceable,
    check_writable_target,
    clear_run_folder,
    contains,
    is_run_folder,
    write_marker,
)
from hftrain.run_tokenizer import prepare_tokenizer, save_run_tokenizer
from hftrain.sharding import (
    building_the_model,
    configure_deepspeed,
    enable_sharding_on_cpu,
    is_sharded,
    wrap_each_layer_by_default,
)
from hftrain.signals import StopRequest
from hftrain.tracking import (
    MetricsLog,
    default_trackers,
    flat_config,
    flops_per_token,
    peak_memory_gb,
    peak_tflops,
    plot_losses,
    progress_bar,
)
from hftrain.train_state import DataFiles, TokenizerIdentity, TrainState
from hftrain.train_step import TrainStep
from hftrain.workers import check_not_a_worker, start_worker_server, usable_cpus, worker_count


@dataclass
class TrainResult:
    model: Any
    """The trained model, unwrapped from Accelerate, in eval mode (None if nothing ran)."""
    run_dir: Path
    final_dir: Path | None
    val: dict[str, float]
    sample: str
    train_seconds: float
    step: int = 0
    interrupted: int = 0
    """The signal (SIGTERM, SIGINT) that stopped the run early after a checkpoint; 0 if none."""
    checkpoint: Path | None = None
    steps_run: int = 0
    """Optimizer steps this call made (fewer than `step` after a resume)."""
    already_finished: bool = False
    """`--resume` found the run finished at its max_steps: nothing was done."""


def protected_paths(recipe: Recipe, recipe_path: Path | None) -> list[Path]:
    """The recipe and the local data files: a run folder must never contain them. (A run's
    own recipe.yaml is hftrain's: `hftrain train runs/x/recipe.yaml --resume` is fine.)"""
    paths = [Path(p) for p in expand_globs([*recipe.data.train_files, *recipe.data.val_files])]
    own_recipe = Path(recipe.run.output_dir) / "recipe.yaml"
    if recipe_path and not (own_recipe.exists() and own_recipe.samefile(recipe_path)):
        paths.append(recipe_path)
    reused = (recipe.model.init_from, recipe.tokenizer.name_or_path)  # folders a run starts from
    return paths + [Path(p) for p in reused if p and Path(p).exists()]


def check_cache_target(recipe: Recipe, recipe_path: Path | None) -> None:
    """`data.cache` may be rebuilt in place: it must hold none of the data or the recipe, and
    be neither the run folder nor inside it (a run folder holds only hftrain's run files)."""
    cache, run_dir = Path(recipe.data.cache), Path(recipe.run.output_dir)
    check_writable_target(cache, protected_paths(recipe, recipe_path), "data.cache")
    if contains(run_dir, cache) or contains(cache, run_dir):
        raise HftrainError(f"data.cache '{cache}' and run.output_dir '{run_dir}' overlap; give "
                           "the token cache a folder of its own (e.g. cache/NAME)")
    token_cache.check_target(recipe.data)


def start_run_folder(run_dir: Path, recipe: Recipe, tokenizer: Any, built: bool,
                     plan: Plan) -> None:
    """Called under the run lock once every input has been checked: only now does the run
    write anything. The folder is checked again, since another process may have started a
    run in it after `plan_run` looked."""
    if plan.checkpoint is None and not plan.restart:
        check_new_run_target(run_dir, recipe.run.overwrite)
        if recipe.run.overwrite and is_run_folder(run_dir):
            clear_run_folder(run_dir)
    check_replaceable(run_dir, "final")  # the export replaces it whole at the end
    try:
        if is_run_folder(run_dir):  # from now on the run is not finished, until _finish says so
            write_marker(run_dir, finished_step=None)
        if built:
            save_run_tokenizer(tokenizer, recipe, run_dir / "tokenizer")
        dump_recipe(recipe, run_dir / "recipe.yaml")  # on resume: with the new lengths
    except OSError as exc:  # a full disk before the first step: nothing of the run is lost
        raise HftrainError(f"cannot write the run folder {run_dir}: {exc.strerror}") from None


@dataclass
class RunParts:
    """Everything a run is built from, made (and so checked) before the run folder is written."""

    tokenizer: Any
    tokenizer_built: bool
    streams: DataStreams
    batches: Any
    """The training stream (`TrainStream` or another with `state_dict`), its first batch
    already pulled with `peek` (which `next` returns again)."""
    first_batch: dict[str, torch.Tensor]
    model: Any
    optimizer: Any
    scheduler: Any


@contextmanager
def naming_the_recipe(recipe_path: Path | None) -> Iterator[None]:
    """The model's and the optimizer's refusals name recipe keys (`model.init_from`,
    `train.optimizer`); add the file, as the recipe loader does for its own."""
    try:
        yield
    except RecipeError:
        raise
    except HftrainError as exc:
        if recipe_path is None:
            raise
        raise RecipeError(f"{recipe_path}: {exc}") from None


def check_resources(recipe: Recipe, accelerator: Accelerator, tokenizer: Any,
                    recipe_path: Path | None) -> None:
    """Before anything large is allocated: refuse sizes that cannot fit in memory (one line
    naming the key), and say when fewer data workers start than the recipe asks for."""
    with naming_the_recipe(recipe_path), building_the_model(accelerator):
        sizes = model_sizes(recipe.model, tokenizer, recipe.data.block_size)
    shards = accelerator.num_processes if is_sharded(accelerator) else 1
    on_every_process(accelerator, lambda: check_fits(recipe, len(tokenizer), sizes,
                                                     accelerator.device, shards))
    workers = recipe.data.num_workers
    if accelerator.is_main_process and worker_count(workers) < workers:
        print(f"hftrain: warning: data.num_workers {workers} is more than the "
              f"{usable_cpus()} CPUs this process may use; {worker_count(workers)} workers "
              "read the data (the batches are the same)", file=sys.stderr)


def build_parts(recipe: Recipe, accelerator: Accelerator, recipe_path: Path | None = None,
                builds_cache: bool = True) -> RunParts:
    """Tokenizer, data (one batch of each split pulled), model, optimizer, schedule and the
    generation settings: a bad file or setting fails here, with nothing written but the token
    cache (built where `builds_cache`)."""
    tokenizer, built = on_every_process(accelerator, lambda: prepare_tokenizer(recipe))
    check_resources(recipe, accelerator, tokenizer, recipe_path)
    if recipe.data.cache:  # tokenized once per filesystem, before any rank reads it

        def prepare_cache() -> dict[str, Any] | None:
            folder = token_cache.prepare(recipe.data, tokenizer)
            return token_cache.split_digests(folder) if accelerator.num_processes > 1 else None

        build_once_per_filesystem(accelerator, builds_cache, prepare_cache)

    def set_up_data() -> tuple[DataStreams, Any, dict[str, torch.Tensor]]:
        streams = DataStreams(recipe.data, tokenizer, seed=recipe.run.seed,
                              stateful=recipe.train.stateful, rank=accelerator.process_index,
                              world_size=accelerator.num_processes,
                              pin_memory=accelerator.device.type == "cuda")
        batches = streams.train_batches(recipe.train.batch_size)
        first_batch = batches.peek()
        streams.check_val(recipe.eval.batch_size)
        return streams, batches, first_batch

    # each node reads its own disk (its copy of the data, its cache): a refusal on one node
    streams, batches, first_batch = on_every_process(accelerator, set_up_data)  # stops all
    with naming_the_recipe(recipe_path), building_the_model(accelerator):
        model = build_model(recipe.model, tokenizer, recipe.data.block_size)
        if not is_sharded(accelerator):  # sharded: `prepare` puts each rank's shard there
            model.to(accelerator.device)
        optimizer = build_optimizer(model, recipe.train, accelerator.device)
    model.generation_config = generation_config(recipe, tokenizer)
    configure_deepspeed(accelerator, recipe.train)
    client_optimizer = optimizer
    model, optimizer = accelerator.prepare(model, optimizer)
    # after `prepare`: DeepSpeed's ZeRO regroups the client optimizer's parameters
    scheduler = build_scheduler(client_optimizer, recipe.train)
    return RunParts(tokenizer, built, streams, batches, first_batch, model, optimizer, scheduler)


def train(recipe: Recipe, recipe_path: Path | None = None) -> TrainResult:
    """Run a recipe end to end: tokenizer, data, model, training, evaluation, export, sample.

    `recipe_path` is the file the recipe came from, which the run folder must not contain.
    Bad input found before the run folder is written raises an HftrainError; a failure after
    a checkpoint raises a ResumableError holding it and the checkpoint `--resume` starts from.
    """
    check_not_a_worker()
    run_dir = Path(recipe.run.output_dir)
    if recipe.data.num_workers:
        start_worker_server()
    trackers = default_trackers() if recipe.run.trackers is None else recipe.run.trackers
    with naming_the_recipe(recipe_path):
        check_attention_available(recipe.model)
    check_sharding_before_start(cpu=_cpu_data_parallel())  # Accelerate would not shard
    wrap_each_layer_by_default()
    accelerator = Accelerator(
        mixed_precision=recipe.train.mixed_precision,
        cpu=_cpu_data_parallel(),
        log_with=trackers or None,
        project_dir=str(run_dir),
        dynamo_backend="inductor" if recipe.train.compile else None,
    )
    enable_sharding_on_cpu(accelerator)  # Accelerate shards only on GPUs; FSDP2 and ZeRO on CPU
    check_sharding_set_up(accelerator)
    report_setup(accelerator, recipe.train.mixed_precision)  # what runs, said once
    with naming_the_recipe(recipe_path):
        check_attention_precision(recipe.model, precision_that_runs(accelerator))
    keep_freed_heap_memory(accelerator.device)
    set_seed(recipe.run.seed)
    check_writable_target(run_dir, protected_paths(recipe, recipe_path), "run.output_dir")
    check_same_recipe(accelerator, recipe.to_dict())  # each node's agent has its own command
    check_shared(accelerator, {"run.output_dir": run_dir})  # what rank 0 writes, all read
    builds_cache = False
    if recipe.data.cache:  # a stale cache is rebuilt in place: never over the data
        on_every_process(accelerator, lambda: check_cache_target(recipe, recipe_path))
        builds_cache = builds_token_cache(accelerator, Path(recipe.data.cache))
    with RunLock(run_dir, enabled=accelerator.is_main_process) as lock:

        def plan() -> Plan:
            if is_run_folder(run_dir):  # before reading its checkpoints, which a writer prunes
                lock.acquire()
            return plan_run(recipe, run_dir, recipe.checkpoint.resume == "auto",
                            launch_trajectory(accelerator))

        decided = on_main_process(accelerator, plan)
        if decided.finished:
            return TrainResult(None, run_dir, run_dir / "final", {}, "", 0.0,
                               recipe.train.max_steps, already_finished=True)
        parts = build_parts(recipe, accelerator, recipe_path, builds_cache)

        def start() -> None:
            lock.acquire()
            start_run_folder(run_dir, recipe, parts.tokenizer, parts.tokenizer_built, decided)

        on_main_process(accelerator, start)
        return _run_in_folder(recipe, accelerator, decided, parts, trackers)


def on_main_process(accelerator: Accelerator, decide: Any) -> Any:
    """Run `decide()` on the main process only (it reads or writes the run folder: the lock,
    the checkpoints to resume from, the folder's first files) and give every process its
    result, or its refusal: the main process raises the HftrainError with its one line, the
    others `ReportedByMainProcess`, on which they exit quietly instead of dying in the next
    collective."""
    result = error = None
    if accelerator.is_main_process:
        try:
            result = decide()
        except HftrainError as exc:
            if accelerator.num_processes == 1:
                raise
            error = str(exc)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        result, error = broadcast_object_list([result, error], from_process=0)
        if error is not None:  # every rank exits: close gloo/NCCL before the peers vanish, or
            torch.distributed.destroy_process_group()  # its threads may abort the process
    if error is not None:
        raise HftrainError(error) if accelerator.is_main_process else ReportedByMainProcess(error)
    return result


def _run_in_folder(recipe: Recipe, accelerator: Accelerator, plan: Plan, parts: RunParts,
                   trackers: list[str]) -> TrainResult:
    """Under the lock, with every input checked: write the folder, then train and finish."""
    run_dir = Path(recipe.run.output_dir)
    if trackers:
        accelerator.init_trackers("hftrain", config=flat_config(recipe.to_dict()))
    log = MetricsLog(run_dir / "metrics.jsonl", accelerator.is_main_process, accelerator)
    loop = TrainingLoop(recipe, accelerator, parts.model, parts.optimizer, parts.scheduler,
                        parts.streams, log, run_dir, parts.batches, parts.tokenizer)
    if plan.checkpoint is not None:
        loop.resume(plan.checkpoint)
        accelerator.print(f"resumed from {plan.checkpoint} at step {loop.step}")
    elif plan.restart:
        log.truncate(0)
        accelerator.print(f"{run_dir} has no checkpoint: training starts again at step 0")
    _print_global_batch(accelerator, recipe, parts.first_batch)
    with StopRequest() as stop:
        try:
            return _train_and_finish(loop, parts, stop)
        except Exception as exc:  # the CLI tells how to resume from the newest checkpoint
            newest = loop.settle_checkpoint()
            if newest is not None and not loop.finished:  # once exported, nothing to resume
                raise ResumableError(exc, newest) from exc
            raise
        finally:  # no checkpoint is left completing once the run folder's lock is let go
            loop.settle_checkpoint()
            accelerator.end_training()  # close the trackers however the run ended


def _train_and_finish(loop: TrainingLoop, parts: RunParts, stop: StopRequest) -> TrainResult:
    first_step, started = loop.step, time.perf_counter()
    loop.run(stop)
    result = TrainResult(None, loop.run_dir, None, {}, "", time.perf_counter() - started,
                         loop.step, loop.interrupted, loop.last_checkpoint,
                         loop.step - first_step)
    if loop.interrupted:
        result.model = bare_model(loop.accelerator, loop.model).eval()
    else:
        _finish(loop, parts.tokenizer, result, stop)
    return result


def _finish(loop: TrainingLoop, tokenizer: Any, result: TrainResult, stop: StopRequest) -> None:
    """After the last step, with the run checkpointed: final evaluation, export, mark the run
    finished, plot, sample, push. A failure here leaves a run `--resume` finishes."""
    accelerator, recipe, run_dir = loop.accelerator, loop.recipe, loop.run_dir
    if stop.signum:  # arrived while the last step was being checkpointed: stop now
        raise RunStopped(stop.signum, "the last checkpoint")
    stop.raise_from_now_on("the final evaluation")
    result.val = loop.evaluate(max_batches=None)
    stop.raise_from_now_on("the export")
    try:
        result.final_dir, model = export(accelerator, loop.model, tokenizer, recipe, run_dir)
    except WRITE_ERRORS as exc:  # a full disk, a read-only folder
        raise HftrainError(f"could not write the export {run_dir / 'final'} "
                           f"({write_error_reason(exc)})") from None
    result.model = model.eval() if model is not None else None  # sharded: main process only
    push_hint = (f"hftrain push {result.final_dir} --repo-id {recipe.hub.repo_id}"
                 f"{' --private' if recipe.hub.private else ''}")
    stop.raise_from_now_on(
        "the sample and push", f"the run is finished and exported to {result.final_dir}"
        + (f"; push it with: {push_hint}" if recipe.hub.push_to_hub else ""))
    if accelerator.is_main_process:
        write_marker(run_dir, finished_step=loop.step)
    loop.finished = True
    if accelerator.is_main_process:
        _plot(run_dir)
        result.sample = _sample(model, tokenizer, recipe)
        if recipe.hub.push_to_hub:
            try:
                push(result.final_dir, recipe.hub.repo_id, run_dir / "hub",
                     private=recipe.hub.private)
            except HftrainError as exc:
                raise HftrainError(f"{exc}. The run is finished and exported; retry with: "
                                   f"{push_hint}") from None


def _sample(model: Any, tokenizer: Any, recipe: Recipe) -> str:
    sample = recipe.sample
    if sample.max_new_tokens == 0:
        return ""
    return generate_text(model, tokenizer, sample.prompt, sample.max_new_tokens,
                         sample.temperature, sample.top_k)


def _plot(run_dir: Path) -> None:
    """loss.png: a picture, so a failure to draw it (a full disk) is a warning, not an error."""
    out = run_dir / "loss.png"
    try:
        plot_losses(run_dir / "metrics.jsonl", out)
    except (OSError, RuntimeError, ValueError) as exc:
        out.unlink(missing_ok=True)
        print(f"hftrain: warning: could not draw {out}: {exc}", file=sys.stderr)


def _print_global_batch(accelerator: Accelerator, recipe: Recipe, batch: dict) -> None:
    cfg, processes = recipe.train, accelerator.num_processes
    accelerator.print(
        f"global batch: {cfg.global_batch(processes)} blocks x {batch['input_ids'].shape[1]} "
        f"tokens (batch_size {cfg.batch_size} x grad_accum_steps {cfg.grad_accum_steps} x "
        f"{processes} process{'es' if processes > 1 else ''})"
    )


def _cpu_data_parallel() -> bool:
    """Several processes (torchrun) and no GPU: Accelerate must be told to use gloo on CPU."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


class TrainingLoop:
    """Optimizer steps with token-normalised gradient accumulation, logging and evaluation.

    Between log lines the loop never waits for the device: the loss, the finite-loss check
    and the counters stay on it (`TrainState`), and a step with a non-finite loss is skipped
    on the device (the fused optimizer's `found_inf`, as `GradScaler` does), so "a NaN never
    updates the model" holds without reading the loss back every step.
    """

    def __init__(self, recipe: Recipe, accelerator: Accelerator, model: Any, optimizer: Any,
                 scheduler: Any, streams: DataStreams, log: MetricsLog,
                 run_dir: Path | None = None, batches: Any = None, tokenizer: Any = None) -> None:
        self.recipe = recipe
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.streams = streams
        self.log = log
        self.run_dir = run_dir
        self.state = TrainState(batches, accelerator.device)
        self.checkpointer = Checkpointer(accelerator, run_dir, {
            "loop": self.state, "data": batches, "scheduler": scheduler, "metrics": log,
            "data_files": DataFiles(streams.fingerprints if streams else {},
                                  accelerator.is_main_process),
            **({"tokenizer": TokenizerIdentity(tokenizer)} if tokenizer is not None else {})})
        """The run's resumable state, one object of parts (model, optimizer and RNG states
        are Accelerate's, which the checkpointer saves through `save_state`)."""
        self.window_data_wait = 0.0  # seconds spent in `next(batches)`, for `data_wait`
        self.flops_per_token = flops_per_token(bare_model(accelerator, model),
                                               recipe.data.block_size)
        self.peak_tflops = peak_tflops(recipe.train.peak_tflops)
        self.interrupted = 0
        self.updating = False
        """Inside an optimizer step: weights or optimizer state may be part-way updated, so a
        failure here is not followed by a checkpoint."""
        self.finished = False
        """Exported and marked finished: a later failure (sample, push) leaves nothing to
        resume."""
        self.last_save = time.monotonic()
        """When the last checkpoint was saved (or the loop made): for `checkpoint.minutes`."""
        self.stateful = recipe.train.stateful
        self.train_step = TrainStep(accelerator, model, optimizer, scheduler, recipe.train)

    @property
    def step(self) -> int:
        return self.state.step

    def run(self, stop: StopRequest) -> None:
        """Train to `max_steps`, or until `stop` asks; the bar is closed however it ends.

        Either way the last step is checkpointed. If a step fails (bad data, a data file
        deleted, a full disk), the last completed step is checkpointed before the error goes
        on, so fixing the cause and `--resume` loses nothing; with several processes the
        others may be waiting in a collective, so only the interval checkpoints are kept.
        """
        cfg, batches = self.recipe.train, self.state.data
        self.model.train()
        try:
            with progress_bar(cfg.max_steps, self.accelerator.is_main_process) as bar:
                bar.update(self.step)  # a resumed run starts part-way
                self._run(batches, stop, bar)
        except Exception as exc:
            self._save_after_failure(exc)
            raise
        finally:
            batches.close()  # stop the data workers
        self.settle_checkpoint()  # a checkpoint completing in the background, first
        if not self._checkpointed():
            self.save_checkpoint()

    @property
    def last_checkpoint(self) -> Path | None:
        """The run's newest complete checkpoint (one saved in the background counts once its
        manifest is written and it is renamed into place)."""
        return self.checkpointer.latest

    def settle_checkpoint(self) -> Path | None:
        """Wait for a checkpoint completing in the background; returns the newest complete
        one. For the paths where another failure is already being reported: a save that
        failed in the background is a warning here, not a second error. A Ctrl-C during the
        wait (a second or two of hashing) is held until the checkpoint is complete, so the
        run folder's lock is never let go while it is still being written."""
        interrupted = None
        while True:
            try:
                newest = self.checkpointer.wait()
                break
            except KeyboardInterrupt as exc:
                interrupted = exc
                print("hftrain: finishing the checkpoint being written ...", file=sys.stderr)
            except Exception as exc:  # noqa: BLE001 - reported beside the first failure
                print(f"hftrain: warning: {one_line(exc)}", file=sys.stderr)
                newest = self.last_checkpoint
                break
        if interrupted is not None:
            raise interrupted
        return newest

    def _checkpointed(self) -> bool:
        last = self.last_checkpoint
        return last is not None and last.name == f"step-{self.step:08d}"

    def _save_after_failure(self, exc: Exception) -> None:
        """Checkpoint the last completed step after a failure (reading data, evaluating,
        logging) when that is safe and new: not inside an update, not with several processes
        (the others may wait in a collective), not after a failed save or a NaN stop."""
        self.settle_checkpoint()
        if (self.accelerator.num_processes > 1 or self.step == 0 or self._checkpointed()
                or self.updating or isinstance(exc, (CheckpointError, TrainingDiverged))):
            return
        self.state.data.rollback_step()  # the failed step's batches were not trained on
        try:  # keep every earlier checkpoint too: this one was not planned
            self.save_checkpoint(keep=self.recipe.checkpoint.keep + 1)
        except CheckpointError:
            return
        except Exception as other:  # noqa: BLE001 - the failure being reported comes first
            print(f"hftrain: warning: could not checkpoint after the failure "
                  f"({one_line(other)})", file=sys.stderr)

    def _run(self, batches: Iterator[dict[str, torch.Tensor]], stop: StopRequest,
             bar: Any) -> None:
        cfg, every = self.recipe.train, self.recipe.checkpoint.interval
        window_start = time.perf_counter()
        while self.step < cfg.max_steps:
            waited = time.perf_counter()
            batches.begin_step()
            micro_batches = [next(batches) for _ in range(cfg.grad_accum_steps)]
            self.window_data_wait += time.perf_counter() - waited
            lr = self.scheduler.get_last_lr()[0]
            self.updating = True  # a failure from here to the end of the update: no
            loss, finite, n_tokens = self.optimizer_step(micro_batches)  # half-step checkpoint
            self.updating = False
            self.state.add_step(loss, finite, n_tokens, len(micro_batches))
            batches.end_step()
            bar.update(1)
            log_step = self.step % cfg.log_interval == 0 or self.step == cfg.max_steps
            if log_step:
                self._show_window(bar, self.log_window(lr, window_start))
                window_start = time.perf_counter()
            if self.step % self.recipe.eval.interval == 0 and self.step < cfg.max_steps:
                val = self.evaluate(self.recipe.eval.max_batches)
                bar.write(f"step {self.step}: val_loss {val['loss']:.4f} "
                          f"val_ppl {val['perplexity']:.3f}")
                window_start, self.window_data_wait = time.perf_counter(), 0.0
            saved = every and self.step % every == 0 and self.save_checkpoint(background=True)
            stopping, due = self._agreed(stop.signum, self._checkpoint_due(), log_step
                                         or bool(saved) or self.step % STOP_CHECK_STEPS == 0)
            if (stopping or due) and not saved:
                self.save_checkpoint(background=True)
            if stopping:
                self.interrupted = stop.signum or signal.SIGTERM
                break

    def log_window(self, lr: float, window_start: float) -> dict[str, Any]:
        """Write the mean loss of the steps since the last log line, and start a new window.
        Reading the window's sums is the loop's one wait for the device between log lines
        (the window's time is taken after it, when the window's work is done)."""
        n_tokens = self.state.window_tokens
        window_loss, steps, skipped, first_skipped = self.state.close_window()
        elapsed = time.perf_counter() - window_start
        tokens_per_s = n_tokens / max(elapsed, 1e-9)
        peak_gb = peak_memory_gb(self.accelerator.device)
        if self.accelerator.num_processes > 1:  # each rank holds its share of the mean; the
            window_loss = self.accelerator.reduce(window_loss, "sum")  # peak is the largest
            peak = torch.tensor(peak_gb, device=self.accelerator.device)
            peak_gb = self.accelerator.reduce(peak, "max").item()
        if skipped and self.recipe.train.on_nan == "stop":
            self._diverged(first_skipped, skipped, steps + skipped)
        # a window whose every step was skipped has no loss: null, never a made-up 0.0
        record = {"step": self.step, "loss": window_loss.item() / steps if steps else None,
                  "lr": lr, "tokens": self.state.tokens_seen, "tokens_per_s": tokens_per_s,
                  # the share of the window this process spent waiting for its batches
                  "data_wait": min(self.window_data_wait / max(elapsed, 1e-9), 1.0),
                  "peak_mem_gb": peak_gb}
        if self.peak_tflops:  # achieved model FLOP/s per device over the device's peak
            per_device = tokens_per_s / self.accelerator.num_processes * self.flops_per_token
            record["mfu"] = per_device / (self.peak_tflops * 1e12)
        if self.state.skipped_steps:
            record["skipped_steps"] = self.state.skipped_steps
        self.log.write(record)
        self.window_data_wait = 0.0
        return record

    def _show_window(self, bar: Any, record: dict[str, Any]) -> None:
        """The bar's figures for the window just logged. A window whose every step was
        skipped has no loss to show: it says so on a line of its own (the bar's postfix may
        not reach a log file for 30 s), rather than show a loss of 0."""
        skipped = record["loss"] is None
        bar.set_postfix(loss="skipped" if skipped else f"{record['loss']:.4f}",
                        lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:,.0f}")
        if skipped:
            bar.write(f"step {self.step}: every step since the last log line was skipped "
                      f"(loss not finite; {record['skipped_steps']} skipped in all), no loss "
                      "to log")

    def _diverged(self, first: int, skipped: int, window: int) -> None:
        newest = self.settle_checkpoint()
        kept = f"the newest checkpoint is {newest}" if newest else "no checkpoint was saved"
        raise TrainingDiverged(
            f"the training loss was not finite at step {first} ({skipped} of the {window} "
            f"steps up to step {self.step}); those steps did not update the model ({kept}). "
            "Lower train.lr in a new run, or --resume with train.on_nan=skip")

    def _checkpoint_due(self) -> bool:
        """`checkpoint.minutes` have passed since the last checkpoint (or the start)."""
        minutes = self.recipe.checkpoint.minutes
        return minutes > 0 and time.monotonic() - self.last_save >= minutes * 60

    def _agreed(self, signum: int, due: bool, sync_point: bool) -> tuple[bool, bool]:
        """Whether any process was asked to stop, and whether any found a time-based
        checkpoint due: all must stop or save after the same step. With several GPU processes
        they agree at log lines, checkpoints and every STOP_CHECK_STEPS steps (a collective
        the host waits for is a synchronisation); on CPU, where waiting costs nothing, after
        every step."""
        if self.accelerator.num_processes == 1:
            return bool(signum), due
        if not sync_point and self.accelerator.device.type != "cpu":
            return False, False
        flags = torch.tensor([float(signum), float(due)], device=self.accelerator.device)
        stopping, due = self.accelerator.reduce(flags, "max").tolist()
        return bool(stopping), bool(due)

    def save_checkpoint(self, keep: int | None = None, background: bool = False) -> Path:
        """Checkpoint every part of the run's state, with the trajectory a resume must match;
        with `background`, completed while training goes on (`Checkpointer.save`)."""
        saved = self.checkpointer.save(
            self.step, trajectory(self.recipe, launch_trajectory(self.accelerator)),
            keep or self.recipe.checkpoint.keep, background=background)
        self.last_save = time.monotonic()
        return saved

    def resume(self, path: Path) -> None:
        """Continue from a checkpoint: every part of the run's state as it was (the stream
        continues at the saved position without reading what came before; log records
        written after it, by the run that died or the final evaluation of a run being
        continued, are dropped)."""
        self.checkpointer.load(path)

    def optimizer_step(self, micro_batches: list[dict[str, torch.Tensor]]
                       ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One update (`hftrain.train_step.TrainStep`), carrying the recurrent state from
        step to step; returns the step's mean token loss, whether it is finite (device
        tensors) and the tokens processed."""
        result = self.train_step(micro_batches, self.state.recurrent)
        self.state.recurrent = result.recurrent
        return result.loss, result.finite, result.tokens

    def evaluate(self, max_batches: int | None) -> dict[str, float]:
        batches = self.streams.val_batches(self.recipe.eval.batch_size)
        # Unwrapped: ranks may hold unequal numbers of validation batches, and a DDP-wrapped
        # forward may wait on the other ranks; the sums are reduced once at the end instead.
        # A sharded model's forward needs every rank whatever the wrapper: they go in lockstep.
        model = bare_model(self.accelerator, self.model)
        val = evaluate_lm(model, batches, self.accelerator, max_batches, stateful=self.stateful,
                          lockstep=is_sharded(self.accelerator))
        self.log.write({"step": self.step, "val_loss": val["loss"],
                        "val_ppl": val["perplexity"], "val_bpb": val["bits_per_byte"],
                        "val_tokens": val["tokens"]})
        return val


STOP_CHECK_STEPS = 10
"""With several GPU processes, how often (in steps) they agree on a stop request."""
