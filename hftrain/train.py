"""The training run on Accelerate: validate inputs, build, loop, evaluate, export.

Order matters for "bad input loses nothing": the tokenizer is built and the first batches are
pulled from both data splits *before* the run folder is created, so a missing file, an empty
corpus or an over-long block fails with nothing written.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import GenerationConfig

from hftrain.allocator import keep_freed_heap_memory
from hftrain.atomic import atomic_directory
from hftrain.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from hftrain.data import IGNORE_INDEX, DataStreams, describe_source, text_stream, texts
from hftrain.errors import HftrainError, TrainingDiverged
from hftrain.evaluation import evaluate_lm, token_byte_lengths, token_nll
from hftrain.generation import generate_text
from hftrain.hub import push
from hftrain.models import build_model
from hftrain.models.base import is_lora
from hftrain.optim import build_optimizer, build_scheduler
from hftrain.recipe import Recipe, dump_recipe
from hftrain.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer
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


@dataclass
class TrainResult:
    model: Any
    """The trained model, unwrapped from Accelerate, in eval mode."""
    run_dir: Path
    final_dir: Path | None
    val: dict[str, float]
    sample: str
    train_seconds: float
    step: int = 0
    interrupted: int = 0
    """The signal (SIGTERM, SIGINT) that stopped the run early after a checkpoint; 0 if none."""
    checkpoint: Path | None = None


def prepare_tokenizer(recipe: Recipe) -> tuple[Any, bool]:
    """The recipe's tokenizer and whether it was built now (and so still needs saving).

    Order of preference: `tokenizer.name_or_path`; the tokenizer of `model.init_from`; a
    tokenizer already in the run folder (from `hftrain tokenizer`); otherwise one built from
    the training stream.
    """
    if recipe.tokenizer.name_or_path or recipe.model.init_from:
        name = recipe.tokenizer.name_or_path or recipe.model.init_from
        return load_tokenizer(name, trust_remote_code=recipe.model.trust_remote_code), False
    saved = Path(recipe.run.output_dir) / "tokenizer"
    if (saved / "tokenizer.json").is_file() and not recipe.run.overwrite:
        return load_tokenizer(str(saved)), False
    corpus = texts(text_stream(recipe.data, "train"))
    source = describe_source(recipe.data, "train")
    return build_tokenizer(recipe.tokenizer, corpus, recipe.data.block_size, source), True


def refuse_finished_run(run_dir: Path, overwrite: bool) -> None:
    if (run_dir / "metrics.jsonl").exists() and not overwrite:
        raise HftrainError(
            f"{run_dir} already holds a run; choose another run.output_dir "
            "or pass run.overwrite=true to replace it"
        )


def start_run_folder(run_dir: Path, recipe: Recipe, tokenizer: Any, built: bool) -> None:
    """Called once every input has been checked: only now does the run write anything."""
    if recipe.run.overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if built:
        save_tokenizer(tokenizer, run_dir / "tokenizer")
    dump_recipe(recipe, run_dir / "recipe.yaml")


def train(recipe: Recipe) -> TrainResult:
    """Run a recipe end to end: tokenizer, data, model, training, evaluation, export, sample."""
    run_dir = Path(recipe.run.output_dir)
    trackers = default_trackers() if recipe.run.trackers is None else recipe.run.trackers
    accelerator = Accelerator(
        mixed_precision=recipe.train.mixed_precision,
        cpu=_cpu_data_parallel(),
        log_with=trackers or None,
        project_dir=str(run_dir),
        dynamo_backend="inductor" if recipe.train.compile else None,
    )
    keep_freed_heap_memory(accelerator.device)
    set_seed(recipe.run.seed)
    resume_from = None
    if recipe.checkpoint.resume == "auto" and not recipe.run.overwrite:
        resume_from = latest_checkpoint(run_dir)
    if resume_from is None:
        refuse_finished_run(run_dir, recipe.run.overwrite)

    tokenizer, built = prepare_tokenizer(recipe)
    streams = DataStreams(recipe.data, tokenizer, seed=recipe.run.seed,
                          stateful=recipe.train.stateful, rank=accelerator.process_index,
                          world_size=accelerator.num_processes)
    train_batches = streams.train_batches(recipe.train.batch_size)
    first_batch = next(train_batches)
    streams.check_val(recipe.eval.batch_size)
    if accelerator.is_main_process and resume_from is None:
        start_run_folder(run_dir, recipe, tokenizer, built)

    model = build_model(recipe.model, tokenizer, recipe.data.block_size)
    optimizer = build_optimizer(model.to(accelerator.device), recipe.train)
    scheduler = build_scheduler(optimizer, recipe.train)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    if trackers:
        accelerator.init_trackers("hftrain", config=flat_config(recipe.to_dict()))
    log = MetricsLog(run_dir / "metrics.jsonl", accelerator.is_main_process, accelerator)
    loop = TrainingLoop(recipe, accelerator, model, optimizer, scheduler, streams, log,
                        token_byte_lengths(tokenizer), run_dir)
    batches = itertools.chain([first_batch], train_batches)
    if resume_from is not None:
        loop.resume(resume_from, batches)
        accelerator.print(f"resumed from {resume_from} at step {loop.step}")
    cfg = recipe.train
    blocks = cfg.batch_size * cfg.grad_accum_steps * accelerator.num_processes
    accelerator.print(
        f"global batch: {blocks} blocks x {first_batch['input_ids'].shape[1]} tokens "
        f"(batch_size {cfg.batch_size} x grad_accum_steps {cfg.grad_accum_steps} x "
        f"{accelerator.num_processes} process{'es' if accelerator.num_processes > 1 else ''})"
    )
    started = time.perf_counter()
    with StopRequest() as stop:
        loop.run(batches, stop)
    train_seconds = time.perf_counter() - started
    unwrapped = bare_model(accelerator, model)
    if loop.interrupted:
        return TrainResult(unwrapped.eval(), run_dir, None, {}, "", train_seconds, loop.step,
                           loop.interrupted, loop.last_checkpoint)

    val = loop.evaluate(max_batches=None)
    final_dir, unwrapped = export(accelerator, model, tokenizer, recipe, run_dir)
    sample = ""
    if accelerator.is_main_process:
        plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
        sample = generate_text(
            unwrapped, tokenizer, recipe.sample.prompt,
            recipe.sample.max_new_tokens, recipe.sample.temperature, recipe.sample.top_k,
        )
        if recipe.hub.push_to_hub:
            push(final_dir, recipe.hub.repo_id, run_dir / "hub", private=recipe.hub.private)
    accelerator.end_training()
    return TrainResult(unwrapped.eval(), run_dir, final_dir, val, sample, train_seconds,
                       loop.step, 0, loop.last_checkpoint)


def bare_model(accelerator: Accelerator, model: Any) -> Any:
    """The model itself: without DDP/FSDP wrappers and without torch.compile's."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def _cpu_data_parallel() -> bool:
    """Several processes (torchrun) and no GPU: Accelerate must be told to use gloo on CPU."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


class StopRequest:
    """Turns SIGTERM and the first Ctrl-C into a request to checkpoint and stop after the
    current step (a second Ctrl-C stops at once). Handlers are restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class TrainingLoop:
    """Optimizer steps with token-normalised gradient accumulation, logging and evaluation."""

    def __init__(self, recipe: Recipe, accelerator: Accelerator, model: Any, optimizer: Any,
                 scheduler: Any, streams: DataStreams, log: MetricsLog,
                 byte_lengths: torch.Tensor, run_dir: Path | None = None) -> None:
        self.recipe = recipe
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.streams = streams
        self.log = log
        self.byte_lengths = byte_lengths
        self.step = 0
        self.tokens_seen = 0
        self.run_dir = run_dir
        self.micro_batches = 0  # consumed from the training stream: the data position
        self.skipped_steps = 0
        # the steps since the last log line: their summed loss, count and tokens
        self.window_loss = torch.zeros((), device=accelerator.device)
        self.window_steps = self.window_tokens = 0
        self.flops_per_token = flops_per_token(bare_model(accelerator, model),
                                               recipe.data.block_size)
        self.peak_tflops = peak_tflops(recipe.train.peak_tflops)
        self.interrupted = 0
        self.last_checkpoint: Path | None = None
        self.stateful = recipe.train.stateful
        self.state = None  # the recurrent state carried across windows (stateful training)

    def run(self, batches: Iterator[dict[str, torch.Tensor]], stop: StopRequest) -> None:
        """Train to `max_steps`, or until `stop` asks; the bar is closed however it ends."""
        cfg = self.recipe.train
        self.model.train()
        with progress_bar(cfg.max_steps, self.accelerator.is_main_process) as bar:
            bar.update(self.step)  # a resumed run starts part-way
            self._run(batches, stop, bar)

    def _run(self, batches: Iterator[dict[str, torch.Tensor]], stop: StopRequest,
             bar: Any) -> None:
        cfg, every = self.recipe.train, self.recipe.checkpoint.interval
        window_start = time.perf_counter()
        while self.step < cfg.max_steps:
            micro_batches = [next(batches) for _ in range(cfg.grad_accum_steps)]
            self.micro_batches += len(micro_batches)
            lr = self.scheduler.get_last_lr()[0]
            loss, n_tokens = self.optimizer_step(micro_batches)
            self.step += 1
            self.tokens_seen += n_tokens
            self.window_tokens += n_tokens
            if loss is not None:
                self.window_loss += loss
                self.window_steps += 1
            bar.update(1)
            if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                record = self.log_window(lr, time.perf_counter() - window_start)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{record['tokens_per_s']:,.0f}")
                window_start = time.perf_counter()
            if self.step % self.recipe.eval.interval == 0 and self.step < cfg.max_steps:
                val = self.evaluate(self.recipe.eval.max_batches)
                bar.write(f"step {self.step}: val_loss {val['loss']:.4f} "
                          f"val_ppl {val['perplexity']:.3f}")
                window_start = time.perf_counter()
            saved = every and self.step % every == 0 and self.save_checkpoint()
            if self._agreed(stop.signum):
                if not saved:
                    self.save_checkpoint()
                self.interrupted = stop.signum or signal.SIGTERM
                break

    def log_window(self, lr: float, elapsed: float) -> dict[str, Any]:
        """Write the mean loss of the steps since the last log line, and start a new window."""
        window_loss = self.window_loss
        if self.accelerator.num_processes > 1:  # each rank holds its share of the mean
            window_loss = self.accelerator.reduce(window_loss.clone(), "sum")
        tokens_per_s = self.window_tokens / max(elapsed, 1e-9)
        record = {"step": self.step, "loss": window_loss.item() / max(self.window_steps, 1),
                  "lr": lr, "tokens": self.tokens_seen, "tokens_per_s": tokens_per_s,
                  "peak_mem_gb": peak_memory_gb(self.accelerator.device)}
        if self.peak_tflops:  # achieved model FLOP/s per device over the device's peak
            per_device = tokens_per_s / self.accelerator.num_processes * self.flops_per_token
            record["mfu"] = per_device / (self.peak_tflops * 1e12)
        if self.skipped_steps:
            record["skipped_steps"] = self.skipped_steps
        self.log.write(record)
        self.window_loss.zero_()
        self.window_steps = self.window_tokens = 0
        return record

    def _agreed(self, signum: int) -> bool:
        """Whether any process was asked to stop: all must stop after the same step."""
        if self.accelerator.num_processes == 1:
            return bool(signum)
        flag = torch.tensor(float(signum), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "max").item())

    def save_checkpoint(self) -> Path:
        state = {"step": self.step, "tokens_seen": self.tokens_seen,
                 "micro_batches": self.micro_batches, "skipped_steps": self.skipped_steps,
                 "window_steps": self.window_steps, "window_tokens": self.window_tokens}
        tensors = {f"state_{i}": t for i, t in enumerate(self.state or ())}
        tensors["window_loss"] = self.window_loss
        self.last_checkpoint = save_checkpoint(self.accelerator, self.run_dir, state, tensors,
                                               self.recipe.checkpoint.keep)
        return self.last_checkpoint

    def resume(self, path: Path, batches: Iterator[dict[str, torch.Tensor]]) -> None:
        """Continue from a checkpoint: Accelerate's state (weights, optimizer, scheduler, RNG),
        the counters, the carried recurrent state, and the data stream replayed to where the
        checkpoint was taken. Log lines written after it (by the run that died) are dropped."""
        state, tensors = load_checkpoint(self.accelerator, path)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.skipped_steps = state["skipped_steps"]
        self.window_steps, self.window_tokens = state["window_steps"], state["window_tokens"]
        self.window_loss = tensors.pop("window_loss")
        self.state = tuple(tensors[f"state_{i}"] for i in range(len(tensors))) or None
        for _ in range(state["micro_batches"]):
            next(batches)
        self.micro_batches = state["micro_batches"]
        self.last_checkpoint = path
        self.log.keep_until(self.step)

    def optimizer_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[Any, int]:
        """One update from several micro-batches; returns (mean token loss, tokens processed).

        The loss of each micro-batch is its summed token NLL divided by the target tokens of
        the *whole* step (all micro-batches, all processes), so uneven counts (padding, masked
        labels) weigh every token equally. DDP averages gradients over processes, hence the
        factor `num_processes`. In stateful training each micro-batch continues the lanes of
        the one before, starting from its (detached) final state.
        """
        acc = self.accelerator
        n_targets = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches)
        if acc.num_processes > 1:
            n_targets = int(acc.reduce(torch.tensor(n_targets, device=acc.device), "sum"))
        scale = acc.num_processes / max(n_targets, 1)
        step_loss = torch.zeros((), device=acc.device)
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            if batch.get("reset_state"):
                self.state = None
            with nullcontext() if last else acc.no_sync(self.model):
                out = self.model(input_ids=batch["input_ids"].to(acc.device),
                                 past_key_values=self.state, use_cache=self.stateful)
                if self.stateful:
                    self.state = tuple(s.detach() for s in out.past_key_values)
                nll = token_nll(out.logits, batch["labels"].to(acc.device)).sum()
                acc.backward(nll * scale)
            step_loss += nll.detach() / max(n_targets, 1)
        n_tokens = sum(b["input_ids"].numel() for b in micro_batches) * acc.num_processes
        if not self._finite(step_loss):
            self.optimizer.zero_grad(set_to_none=True)
            return None, n_tokens
        if self.recipe.train.grad_clip > 0:
            acc.clip_grad_norm_(self.model.parameters(), self.recipe.train.grad_clip)
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss, n_tokens

    def _finite(self, step_loss: torch.Tensor) -> bool:
        """Check the loss before the update; stop with a clear message or skip the step."""
        total = step_loss.detach()
        if self.accelerator.num_processes > 1:  # every rank must take the same decision
            total = self.accelerator.reduce(total.clone(), "sum")
        if torch.isfinite(total):
            return True
        if self.recipe.train.on_nan == "skip":
            self.skipped_steps += 1
            return False
        newest = latest_checkpoint(self.run_dir) if self.run_dir else None
        kept = f"the newest checkpoint ({newest}) is untouched" if newest else "no checkpoint"
        raise TrainingDiverged(
            f"the training loss is {total.item()} at step {self.step + 1}; stopped before "
            f"updating the model ({kept}). Lower train.lr, or set train.on_nan=skip"
        )

    def evaluate(self, max_batches: int | None) -> dict[str, float]:
        batches = self.streams.val_batches(self.recipe.eval.batch_size)
        # Unwrapped: ranks may hold unequal numbers of validation batches, and a DDP-wrapped
        # forward may wait on the other ranks; the sums are reduced once at the end instead.
        model = bare_model(self.accelerator, self.model)
        val = evaluate_lm(model, batches, self.accelerator, self.byte_lengths, max_batches,
                          stateful=self.stateful)
        self.log.write({"step": self.step, "val_loss": val["loss"],
                        "val_ppl": val["perplexity"], "val_bpb": val["bits_per_byte"],
                        "val_tokens": val["tokens"]})
        return val


def export(accelerator: Accelerator, model: Any, tokenizer: Any, recipe: Recipe,
           run_dir: Path) -> tuple[Path, Any]:
    """Write `final/`: safetensors weights, config, tokenizer, generation config, recipe.
    Returns the folder and the model saved there (LoRA adapters merged).

    Plain `transformers` loads it with `AutoModelForCausalLM` and `AutoTokenizer`.
    """
    final_dir = run_dir / "final"
    unwrapped = bare_model(accelerator, model)
    if is_lora(unwrapped):  # LoRA: fold the adapters in; the export is a plain model
        unwrapped = unwrapped.merge_and_unload()
        state_dict = unwrapped.state_dict()
    else:  # torch.compile's wrapper prefixes every key with `_orig_mod.`: the export must not
        state_dict = {k.removeprefix("_orig_mod."): v
                      for k, v in accelerator.get_state_dict(model).items()}
    if accelerator.is_main_process:
        unwrapped.generation_config = generation_config(recipe, tokenizer)
        with atomic_directory(final_dir) as tmp:
            unwrapped.save_pretrained(tmp, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
            dump_recipe(recipe, tmp / "hftrain_recipe.yaml")
    accelerator.wait_for_everyone()
    return final_dir, unwrapped


def generation_config(recipe: Recipe, tokenizer: Any) -> GenerationConfig:
    sample = recipe.sample
    sampling = (
        {"do_sample": True, "temperature": sample.temperature, "top_k": sample.top_k}
        if sample.temperature > 0 else {"do_sample": False}
    )
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=sample.max_new_tokens,
        **sampling,
    )
