"""What a run reports: metrics.jsonl, Accelerate trackers, a progress bar, throughput and
utilisation figures, and a loss-curve plot; files are written by the main process only."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hftrain.atomic import (
    atomic_write_bytes,
    atomic_write_text,
    open_no_follow,
    write_error_reason,
)
from hftrain.errors import HftrainError
from hftrain.recipe import flatten


class MetricsLog:
    """Appends one JSON object per logged step or evaluation to `metrics.jsonl`, and sends the
    same figures to the Accelerate trackers (TensorBoard, trackio, W&B) if any were set up.

    `lines` counts the records in the file; a checkpoint stores it, and a resumed run cuts the
    file back to that many records, dropping what the interrupted run wrote after it."""

    def __init__(self, path: Path | None, enabled: bool, accelerator: Any = None) -> None:
        self.path = path
        self.enabled = enabled
        self.accelerator = accelerator
        self.lines = 0

    def write(self, record: dict[str, Any]) -> None:
        if self.accelerator is not None and self.accelerator.trackers:
            # a figure that does not exist (null: a window of skipped steps) is not sent
            values = {k: v for k, v in record.items() if k != "step" and v is not None}
            self.accelerator.log(values, step=record["step"])
        if self.enabled:
            clean = {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
                     for k, v in record.items()}
            self._append((json.dumps(clean) + "\n").encode("utf-8"))
        self.lines += 1

    def _append(self, line: bytes) -> None:
        """Append one record whole or not at all: a write that fails (a full disk) is cut
        back off, so the next record never continues a torn one, and said in one line."""
        descriptor = open_no_follow(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            size = os.fstat(descriptor).st_size
            try:
                if os.write(descriptor, line) != len(line):  # a partial write: the disk filled
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.ftruncate(descriptor, size)
                raise HftrainError(f"cannot append to {self.path} "
                                   f"({write_error_reason(exc)})") from None
        finally:
            os.close(descriptor)

    def state_dict(self) -> dict[str, int]:
        return {"lines": self.lines}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Cut the file back to the records written up to the checkpoint."""
        self.truncate(state["lines"])

    def truncate(self, n_records: int) -> None:
        """Keep the first `n_records` records, replacing the file atomically: a kill while
        this runs leaves the old file or the new one, never an empty or partial one."""
        self.lines = n_records
        if not self.enabled or not self.path.exists():
            return
        kept = [json.dumps(r) + "\n" for r in read_metrics(self.path)[:n_records]]
        atomic_write_text(self.path, "".join(kept))


class WindowLog:
    """The training records of metrics.jsonl: at each log line, the mean loss of the steps
    since the last one (its window), with the throughput, the share of time spent waiting
    for data, the peak memory and the model FLOP utilisation.

    Reading the window's sums is the loop's one wait for the device between log lines (the
    window's time is taken after it, when the window's work is done)."""

    def __init__(self, metrics: MetricsLog, accelerator: Any, flops: float,
                 peak: float | None, stat_names: tuple[str, ...] = ()) -> None:
        self.metrics, self.accelerator = metrics, accelerator
        self.stat_names = stat_names
        """The objective's figures besides the loss (DPO: `rewards/...`), logged as the
        window's means."""
        self.flops_per_token, self.peak_tflops = flops, peak
        self.data_wait = 0.0
        """Seconds this process spent waiting for its batches in the window."""
        self.start = time.perf_counter()

    def restart(self) -> None:
        """A new window from now (after a log line, or time spent evaluating)."""
        self.start, self.data_wait = time.perf_counter(), 0.0

    def close(self, state: Any, lr: float) -> tuple[dict[str, Any], tuple[int, int, int]]:
        """The record of the window `state` (`TrainState`) holds, not yet written, and its
        skipped steps: (how many, the first, the window's steps). Every process must call it
        (the loss and the peak memory are reduced over them)."""
        n_tokens = state.window_tokens
        stats = state.window_stats.clone() if state.window_stats is not None else None
        window_loss, steps, skipped, first_skipped = state.close_window()
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        tokens_per_s = n_tokens / elapsed
        peak_gb = peak_memory_gb(self.accelerator.device)
        if self.accelerator.num_processes > 1:  # each rank holds its share of the mean; the
            window_loss = self.accelerator.reduce(window_loss, "sum")  # peak is the largest
            peak = torch.tensor(peak_gb, device=self.accelerator.device)
            peak_gb = self.accelerator.reduce(peak, "max").item()
        # a window whose every step was skipped has no loss: null, never a made-up 0.0
        record = {"step": state.step, "loss": window_loss.item() / steps if steps else None,
                  "lr": lr, "tokens": state.tokens_seen, "tokens_per_s": tokens_per_s,
                  # the share of the window this process spent waiting for its batches
                  "data_wait": min(self.data_wait / elapsed, 1.0), "peak_mem_gb": peak_gb}
        if self.peak_tflops:  # achieved model FLOP/s per device over the device's peak
            per_device = tokens_per_s / self.accelerator.num_processes * self.flops_per_token
            record["mfu"] = per_device / (self.peak_tflops * 1e12)
        if stats is not None:  # like the loss: each rank holds its share of the means
            if self.accelerator.num_processes > 1:
                stats = self.accelerator.reduce(stats, "sum")
            record.update({name: value / steps if steps else None for name, value in
                           zip(self.stat_names, stats.tolist(), strict=True)})
        if state.skipped_steps:
            record["skipped_steps"] = state.skipped_steps
        if hasattr(state.data, "report"):  # a mixture: what each source gave
            record.update(self._sources(*state.data.report()))
        return record, (skipped, first_skipped, steps + skipped)

    def _sources(self, tokens: dict[str, int], epochs: dict[str, float]) -> dict[str, Any]:
        """`tokens/NAME`: token positions drawn from each source by all processes;
        `epochs/NAME`: the epochs of it this process has read (each reads its own share)."""
        counts = torch.tensor(list(tokens.values()), dtype=torch.int64)
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts.to(self.accelerator.device), "sum").cpu()
        record = {f"tokens/{name}": int(n) for name, n in zip(tokens, counts.tolist(),
                                                               strict=True)}
        return {**record, **{f"epochs/{name}": round(e, 4) for name, e in epochs.items()}}

    def write(self, record: dict[str, Any], bar: Any) -> None:
        """Write the window's record, show its figures on the bar, and start a new window. A
        window whose every step was skipped has no loss to show: it says so on a line of its
        own (the bar's postfix may not reach a log file for 30 s), rather than show 0."""
        self.metrics.write(record)
        skipped = record["loss"] is None
        shown = {"loss": "skipped" if skipped else f"{record['loss']:.4f}"}
        if record.get("rewards/accuracies") is not None:  # DPO
            shown.update(acc=f"{record['rewards/accuracies']:.3f}",
                         margin=f"{record['rewards/margins']:.3f}")
        bar.set_postfix(**shown, lr=f"{record['lr']:.2e}",
                        tok_s=f"{record['tokens_per_s']:,.0f}")
        if skipped:
            bar.write(f"step {record['step']}: every step since the last log line was skipped "
                      f"(loss not finite; {record['skipped_steps']} skipped in all), no loss "
                      "to log")
        self.restart()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. A torn last line (the process was killed while writing
    it) is ignored; a damaged line elsewhere is an error naming it."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if number == len(lines):
                break
            raise HftrainError(f"{path}:{number}: not a JSON record") from None
    return records


def progress_bar(total: int, enabled: bool) -> tqdm:
    """A live bar on a terminal; in a log file (CI, batch jobs) one line every 30 seconds."""
    interactive = sys.stderr.isatty()
    return tqdm(total=total, disable=not enabled, desc="train", unit="step", dynamic_ncols=True,
                mininterval=0.1 if interactive else 30.0)


def default_trackers() -> list[str]:
    """TensorBoard when it is installed, else none (metrics.jsonl is always written)."""
    import importlib.util

    found = any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX"))
    return ["tensorboard"] if found else []


def flat_config(data: dict[str, Any]) -> dict[str, Any]:
    """The recipe as flat `section.key` scalars, which every tracker can store."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in flatten(data).items()}


PEAK_TFLOPS = (  # (name pattern, dense bf16 TFLOP/s; fp16 for V100 and T4), most specific first
    (r"H200", 989.0), (r"H100 NVL", 835.0), (r"H100 PCIe", 756.0), (r"H100", 989.0),
    (r"A100", 312.0), (r"L40S", 362.0), (r"L40", 181.0), (r"L4", 121.0), (r"A10", 125.0),
    (r"RTX 4090", 165.0), (r"RTX 3090", 71.0), (r"V100", 125.0), (r"T4", 65.0),
)
"""Matched as whole words against `torch.cuda.get_device_name()` ("NVIDIA H100 PCIe",
"NVIDIA L40", "NVIDIA A10G"): "L4" must not take the L40's figure, nor "A10" the A10G's. A card
not listed (the A10G, whose bf16 peak NVIDIA does not publish) gets no MFU: set
`train.peak_tflops` for it."""


def peak_tflops(configured: float | None, name: str | None = None) -> float | None:
    """The recipe's figure, else the table's for this GPU (or the device `name`), else None
    (CPU, unknown GPU)."""
    if configured:
        return configured
    if name is None:
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
    return next((tflops for pattern, tflops in PEAK_TFLOPS
                 if re.search(rf"(?<!\w){pattern}(?!\w)", name)), None)


def flops_per_token(model: Any, block_size: int) -> float:
    """Training FLOPs per token: 6 per parameter (forward and backward), plus attention's
    12 x layers x width x context for transformers (PaLM's estimate, as nanoGPT uses)."""
    # ZeRO-3 leaves each parameter empty between forwards; `ds_numel` is its real size
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    config = model.config
    attention = 0
    heads = getattr(config, "num_attention_heads", None)  # transformers only (GPT-2: n_head)
    if heads:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        attention = 12 * config.num_hidden_layers * heads * head_dim * block_size
    return 6 * n_params + attention


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: GPU memory allocated, or the CPU process's resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def loss_points(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, training loss) of the logged steps. A window whose every step was skipped has
    no loss (null): it becomes NaN, which matplotlib leaves out, so the curve shows a gap
    there instead of a dive to a loss that was never measured."""
    return [(r["step"], math.nan if r["loss"] is None else r["loss"])
            for r in records if "loss" in r]


def _points(records: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records
            if isinstance(r.get(key), int | float) and math.isfinite(r[key])]


def val_summary(val: dict[str, Any]) -> str:
    """A mixture's validation loss per source, DPO's preference figures and the lm-eval task
    metrics, for a progress line (empty when there are none)."""
    scores = val.get("by_source") or {}
    parts = [f"{name} {score['loss']:.4f}" for name, score in scores.items()]
    if "pairs" in val:  # DPO: `dpo.evaluate_preferences`
        parts += [f"reward accuracy {val['reward_accuracy']:.3f}",
                  f"margin {val['reward_margin']:.3f}",
                  f"preference accuracy {val['preference_accuracy']:.3f} (reference "
                  f"{val['reference_preference_accuracy']:.3f})", f"{val['pairs']:,} pairs"]
    parts += [f"{task} {metric} {value:.4f}" for task, metrics in (val.get("tasks") or {}).items()
              for metric, value in metrics.items() if "_stderr" not in metric]
    return "".join(f" | {part}" for part in parts)


def plot_losses(metrics_path: Path, out_path: Path) -> Path | None:
    """Train and validation loss against step (a mixture's sources' validation losses too),
    and below them the lm-eval task metrics scored during training (`eval.tasks`), as a PNG;
    None if matplotlib is missing. Drawn with matplotlib's object API on the Agg canvas, not
    pyplot: no global figure state, no backend chosen for the whole process."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    records = read_metrics(metrics_path)
    train = loss_points(records)
    keys = sorted({k for r in records for k in r})
    sources = [k for k in keys if k.startswith("val_loss/")]
    tasks = [k for k in keys if k.startswith("task/") and "_stderr" not in k]
    fig = Figure(figsize=(7, 7 if tasks else 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(2 if tasks else 1, 1, 1)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    for key, style, label in [("val_loss", "o-", "validation loss"),
                              *((k, ".--", f"validation loss: {k[9:]}") for k in sources)]:
        points = _points(records, key)
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if tasks:
        below = fig.add_subplot(2, 1, 2, sharex=ax)
        for key in tasks:
            below.plot(*zip(*_points(records, key), strict=True), "o-", label=key[5:])
        below.set_xlabel("step")
        below.set_ylabel("lm-eval task metric")
        below.grid(alpha=0.3)
        below.legend()
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png")
    atomic_write_bytes(out_path, image.getvalue())  # never through a link planted there
    return out_path
