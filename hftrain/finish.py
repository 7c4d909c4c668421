"""After the last step, with the run checkpointed: the final evaluation, the export, the
finished marker, the loss plot, a sample and the push. A failure or a signal here leaves a run
that `--resume` finishes (it redoes only what is missing); once the run is marked finished,
nothing is left to resume, and a failed push says the command that retries it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hftrain.atomic import WRITE_ERRORS, write_error_reason
from hftrain.errors import HftrainError, RunStopped
from hftrain.export import export
from hftrain.generation import generate_text
from hftrain.hub import push
from hftrain.lifecycle import RunFolder
from hftrain.recipe import Recipe
from hftrain.signals import StopRequest
from hftrain.tracking import plot_losses
from hftrain.train_state import Run


def finish(run: Run, folder: RunFolder, stop: StopRequest) -> tuple[dict[str, float], Any, str]:
    """Evaluate on the whole validation split, export, mark the run finished, plot, sample
    and push. Returns the validation figures, the exported model in eval mode (None on the
    other processes when it was sharded) and the sample."""
    accelerator, recipe, path = run.accelerator, run.recipe, folder.path
    if stop.signum:  # arrived while the last step was being checkpointed: stop now
        raise RunStopped(stop.signum, "the last checkpoint")
    stop.raise_from_now_on("the final evaluation")
    val = run.evaluate(max_batches=None)
    stop.raise_from_now_on("the export")
    try:
        final_dir, model = export(accelerator, run.model, run.tokenizer, recipe, path)
    except WRITE_ERRORS as exc:  # a full disk, a read-only folder
        raise HftrainError(f"could not write the export {path / 'final'} "
                           f"({write_error_reason(exc)})") from None
    model = model.eval() if model is not None else None  # sharded: main process only
    push_hint = (f"hftrain push {final_dir} --repo-id {recipe.hub.repo_id}"
                 f"{' --private' if recipe.hub.private else ''}")
    stop.raise_from_now_on(
        "the sample and push", f"the run is finished and exported to {final_dir}"
        + (f"; push it with: {push_hint}" if recipe.hub.push_to_hub else ""))
    folder.finish(run.step)
    run.finished = True
    sample = ""
    if accelerator.is_main_process:
        _plot(path)
        sample = _sample(model, run.tokenizer, recipe)
        if recipe.hub.push_to_hub:
            try:
                push(final_dir, recipe.hub.repo_id, path / "hub", private=recipe.hub.private)
            except HftrainError as exc:
                raise HftrainError(f"{exc}. The run is finished and exported; retry with: "
                                   f"{push_hint}") from None
    return val, model, sample


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
