"""The training run on Accelerate: validate inputs, build, loop, evaluate, export.

Order matters for "bad input loses nothing": the tokenizer is built and the first batches are
pulled from both data splits *before* the run folder is created, so a missing file, an empty
corpus or an over-long block fails with nothing written.
"""

from __future__ import annotations

import itertools
import shutil
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

from hftrain.atomic import atomic_directory
from hftrain.data import IGNORE_INDEX, DataStreams, describe_source, text_stream, texts
from hftrain.errors import HftrainError
from hftrain.evaluation import evaluate_lm, token_byte_lengths, token_nll
from hftrain.generation import generate_text
from hftrain.models import build_model
from hftrain.optim import build_optimizer, build_scheduler
from hftrain.recipe import Recipe, dump_recipe
from hftrain.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer
from hftrain.tracking import MetricsLog, progress_bar


@dataclass
class TrainResult:
    model: Any
    """The trained model, unwrapped from Accelerate, in eval mode."""
    run_dir: Path
    final_dir: Path
    val: dict[str, float]
    sample: str
    train_seconds: float


def prepare_tokenizer(recipe: Recipe) -> tuple[Any, bool]:
    """The recipe's tokenizer and whether it was built now (and so still needs saving).

    Order of preference: `tokenizer.name_or_path`; a tokenizer already in the run folder (from
    `hftrain tokenizer`); otherwise one built from the training stream.
    """
    if recipe.tokenizer.name_or_path:
        return load_tokenizer(recipe.tokenizer.name_or_path), False
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
    accelerator = Accelerator(mixed_precision=recipe.train.mixed_precision)
    set_seed(recipe.run.seed)
    run_dir = Path(recipe.run.output_dir)
    refuse_finished_run(run_dir, recipe.run.overwrite)

    tokenizer, built = prepare_tokenizer(recipe)
    streams = DataStreams(recipe.data, tokenizer, seed=recipe.run.seed,
                          stateful=recipe.train.stateful)
    train_batches = streams.train_batches(recipe.train.batch_size)
    first_batch = next(train_batches)
    streams.check_val(recipe.eval.batch_size)
    if accelerator.is_main_process:
        start_run_folder(run_dir, recipe, tokenizer, built)

    model = build_model(recipe.model, tokenizer, recipe.data.block_size)
    optimizer = build_optimizer(model.to(accelerator.device), recipe.train)
    scheduler = build_scheduler(optimizer, recipe.train)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    log = MetricsLog(run_dir / "metrics.jsonl", enabled=accelerator.is_main_process)
    byte_lengths = token_byte_lengths(tokenizer)
    loop = TrainingLoop(recipe, accelerator, model, optimizer, scheduler, streams, log,
                        byte_lengths)
    started = time.perf_counter()
    loop.run(itertools.chain([first_batch], train_batches))
    train_seconds = time.perf_counter() - started

    val = loop.evaluate(max_batches=None)
    final_dir = export(accelerator, model, tokenizer, recipe, run_dir)
    sample = ""
    if accelerator.is_main_process:
        sample = generate_text(
            accelerator.unwrap_model(model), tokenizer, recipe.sample.prompt,
            recipe.sample.max_new_tokens, recipe.sample.temperature, recipe.sample.top_k,
        )
    accelerator.end_training()
    unwrapped = accelerator.unwrap_model(model).eval()
    return TrainResult(unwrapped, run_dir, final_dir, val, sample, train_seconds)


class TrainingLoop:
    """Optimizer steps with token-normalised gradient accumulation, logging and evaluation."""

    def __init__(self, recipe: Recipe, accelerator: Accelerator, model: Any, optimizer: Any,
                 scheduler: Any, streams: DataStreams, log: MetricsLog,
                 byte_lengths: torch.Tensor) -> None:
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
        self.stateful = recipe.train.stateful
        self.state = None  # the recurrent state carried across windows (stateful training)

    def run(self, batches: Iterator[dict[str, torch.Tensor]]) -> None:
        cfg = self.recipe.train
        self.model.train()
        bar = progress_bar(cfg.max_steps, self.accelerator.is_main_process)
        window_loss = torch.zeros((), device=self.accelerator.device)
        window_tokens, window_start = 0, time.perf_counter()
        while self.step < cfg.max_steps:
            micro_batches = [next(batches) for _ in range(cfg.grad_accum_steps)]
            lr = self.scheduler.get_last_lr()[0]
            loss, n_tokens = self.optimizer_step(micro_batches)
            self.step += 1
            self.tokens_seen += n_tokens
            window_loss += loss
            window_tokens += n_tokens
            bar.update(1)
            if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                steps = (self.step - 1) % cfg.log_interval + 1
                elapsed = time.perf_counter() - window_start
                if self.accelerator.num_processes > 1:  # each rank holds its share of the mean
                    window_loss = self.accelerator.reduce(window_loss, "sum")
                record = {"step": self.step, "loss": window_loss.item() / steps, "lr": lr,
                          "tokens": self.tokens_seen, "tokens_per_s": window_tokens / elapsed}
                self.log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{record['tokens_per_s']:,.0f}")
                window_loss.zero_()
                window_tokens, window_start = 0, time.perf_counter()
            if self.step % self.recipe.eval.interval == 0 and self.step < cfg.max_steps:
                val = self.evaluate(self.recipe.eval.max_batches)
                bar.write(f"step {self.step}: val_loss {val['loss']:.4f} "
                          f"val_ppl {val['perplexity']:.3f}")
                window_start = time.perf_counter()
        bar.close()

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
        if self.recipe.train.grad_clip > 0:
            acc.clip_grad_norm_(self.model.parameters(), self.recipe.train.grad_clip)
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        n_tokens = sum(b["input_ids"].numel() for b in micro_batches) * acc.num_processes
        return step_loss, n_tokens

    def evaluate(self, max_batches: int | None) -> dict[str, float]:
        batches = self.streams.val_batches(self.recipe.eval.batch_size)
        val = evaluate_lm(self.model, batches, self.accelerator, self.byte_lengths, max_batches,
                          stateful=self.stateful)
        self.log.write({"step": self.step, "val_loss": val["loss"],
                        "val_ppl": val["perplexity"], "val_bpb": val["bits_per_byte"],
                        "val_tokens": val["tokens"]})
        return val


def export(accelerator: Accelerator, model: Any, tokenizer: Any, recipe: Recipe,
           run_dir: Path) -> Path:
    """Write `final/`: safetensors weights, config, tokenizer, generation config, recipe.

    Plain `transformers` loads it with `AutoModelForCausalLM` and `AutoTokenizer`.
    """
    final_dir = run_dir / "final"
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.generation_config = generation_config(recipe, tokenizer)
        with atomic_directory(final_dir) as tmp:
            unwrapped.save_pretrained(tmp, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
            dump_recipe(recipe, tmp / "hftrain_recipe.yaml")
    accelerator.wait_for_everyone()
    return final_dir


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
