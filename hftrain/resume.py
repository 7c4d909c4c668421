"""What `hftrain train` does with a run folder: start, resume, finish, or refuse.

`--resume` continues *the same run* or refuses. Every checkpoint records the run's trajectory:
the recipe without the keys below, plus what the launch decided (the number of processes, the
sharding, the mixed precision that ran: `launch.launch_trajectory`). A resumed run
whose recipe or launch differs in any other key (the model, the tokenizer, the data, the
batch, the optimizer and its schedule, the precision) would silently mix two runs and export a
recipe that describes neither, so it is refused with the changed keys listed.

Keys that may change on resume: they decide how long the run goes on, what it reports and
where, and what happens after training, not which updates it makes. Raising
`train.max_steps` continues a finished run, on the learning-rate schedule of the new length.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hftrain.checkpoint import latest_checkpoint, newest_intact_checkpoint, read_state
from hftrain.data_check import content_sample
from hftrain.errors import HftrainError
from hftrain.recipe import Recipe, expand_globs, flatten
from hftrain.run_folder import check_new_run_target, has_run, is_run_folder, read_marker
from hftrain.yaml_data import load_yaml

MAY_CHANGE_ON_RESUME = (
    "run.output_dir", "run.overwrite", "run.trackers",
    "train.max_steps", "train.max_tokens", "train.log_interval", "train.on_nan",
    "train.peak_tflops", "train.compile", "train.gradient_checkpointing", "data.num_workers",
    "checkpoint.", "eval.", "sample.", "hub.",
)


def trajectory(recipe: Recipe, launch: dict[str, Any]) -> dict[str, Any]:
    """The flat `section.key -> value` settings that define which updates a run makes, with
    the launch's (`processes`, `launch.*`) (data
    files as the absolute paths of the files they name or match: the same file named from
    another directory is the same data; a new file matching a glob is not)."""
    flat = flatten(recipe.to_dict())
    for i, source in enumerate(flat.pop("data.sources")):  # a change is named by its key
        flat.update({f"data.sources[{i}].{key}": value for key, value in source.items()})
    for key in _file_keys(flat):  # globs as the files they match now
        flat[key] = _absolute(flat[key])
    kept = {k: v for k, v in flat.items()
            if not any(k == m or (m.endswith(".") and k.startswith(m))
                       for m in MAY_CHANGE_ON_RESUME)}
    return {**kept, **launch}


def _file_keys(flat: dict[str, Any]) -> list[str]:
    """The data-file keys: `data.train_files`, `data.val_files`, and each source's."""
    return [key for key in flat
            if key.startswith("data.") and key.endswith((".train_files", ".val_files"))]


def _absolute(files: list[str]) -> list[str]:
    return sorted(os.path.abspath(path) for path in expand_globs(files))


def changed_keys(saved: dict[str, Any], current: dict[str, Any],
                 defaults: dict[str, Any] | None = None) -> list[str]:
    """`key (old -> new)` for every key whose value differs. A key the saved settings lack
    that still has its value in `defaults` is no change: a setting added to hftrain since the
    run started, which the run therefore had at its default."""
    defaults = defaults or {}
    keys = sorted(set(saved) | set(current))
    return [f"{k} ({saved.get(k)!r} -> {current.get(k)!r})" for k in keys
            if saved.get(k) != current.get(k)
            and not (k not in saved and k in defaults and current.get(k) == defaults[k])]


@dataclass
class Plan:
    """What to do: start a new run (`checkpoint` None, `restart` False), continue from
    `checkpoint`, or start the run in the folder over (`restart`: it died before its first
    checkpoint, so nothing is lost)."""

    checkpoint: Path | None = None
    restart: bool = False
    finished: bool = False
    """The run already reached `train.max_steps` and was exported: nothing to do."""


def plan_run(recipe: Recipe, run_dir: Path, resume: bool, launch: dict[str, Any]) -> Plan:
    """Decide from the folder's contents; refuse (HftrainError, one line) what would lose data
    or mix two runs. Writes nothing."""
    if resume and recipe.run.overwrite:
        raise HftrainError("--resume continues the run in run.output_dir and run.overwrite=true "
                           "replaces it: pass one of them")
    if not resume or not run_dir.is_dir() or not has_run(run_dir):
        check_new_run_target(run_dir, recipe.run.overwrite)
        return Plan()
    if not is_run_folder(run_dir) and not (run_dir / "recipe.yaml").is_file():
        raise HftrainError(f"{run_dir} does not hold an hftrain run to resume")
    checkpoint = newest_intact_checkpoint(run_dir)
    current = trajectory(recipe, launch)
    if checkpoint is None:
        if latest_checkpoint(run_dir) is not None:
            raise HftrainError(f"every checkpoint in {run_dir / 'checkpoints'} is damaged; "
                               "start a new run (another run.output_dir or run.overwrite=true)")
        saved = _recipe_trajectory(run_dir / "recipe.yaml", launch)
        _refuse_changes(saved, current, run_dir / "recipe.yaml")
        return Plan(restart=True)
    state = read_state(checkpoint)
    saved = _moved_data(state.get("trajectory", {}), current, state)
    _refuse_changes(saved, current, checkpoint)
    step, max_steps = state["step"], recipe.train.max_steps
    if step > max_steps:
        raise HftrainError(f"the newest checkpoint ({checkpoint}) is at step {step}, past "
                           f"train.max_steps={max_steps}; raise train.max_steps to go on")
    finished = (step == max_steps and read_marker(run_dir).get("finished_step") == step
                and (run_dir / "final" / "config.json").is_file())
    return Plan(checkpoint=checkpoint, finished=finished)


def _moved_data(saved: dict[str, Any], current: dict[str, Any],
                state: dict[str, Any]) -> dict[str, Any]:
    """`saved` with the data files of `current` where they are the checkpoint's files moved
    to other paths with the same bytes (the same `content_sample`s, in the same order), said
    in one line; otherwise as it was (the change is then refused)."""
    samples = (state.get("parts") or {}).get("data_files", {}).get("samples") or {}
    moved = dict(saved)
    for key in _file_keys(saved):
        before, now = saved.get(key), current.get(key)
        if not samples or not isinstance(before, list) or before == now or not now \
                or len(before) != len(now) or any(path not in samples for path in before):
            continue
        try:
            same = [samples[path] for path in before] == [content_sample(path) for path in now]
        except OSError:
            continue
        if same:
            moved[key] = now
            print(f"hftrain: {key} moved since the checkpoint ({before[0]} -> {now[0]}"
                  f"{', ...' if len(now) > 1 else ''}), same bytes: resuming with them",
                  file=sys.stderr)
    return moved


def _recipe_trajectory(path: Path, launch: dict[str, Any]) -> dict[str, Any]:
    from hftrain.recipe import recipe_from_dict

    try:
        saved = recipe_from_dict(load_yaml(path.read_text(encoding="utf-8")), str(path))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, HftrainError, AttributeError):
        return {}
    return trajectory(saved, launch)


def _refuse_changes(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    if not saved:
        return
    saved, current = _regroupable(saved, current, where)
    if not any(k.startswith("launch.") for k in saved):  # recorded since issue 19
        current = {k: v for k, v in current.items() if not k.startswith("launch.")}
    changed = changed_keys(saved, current, flatten(Recipe().to_dict()))
    if changed:
        raise HftrainError(
            f"--resume would continue the run of {where} with a different recipe or launch: "
            f"{'; '.join(changed)}. Resume with the run's own settings, or start a new run"
        )


def _regroupable(saved: dict[str, Any], current: dict[str, Any],
                 where: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run reading a token cache may resume on another number of processes when the
    global batch (batch_size x processes) stays the same: its blocks are one global order
    that any number of ranks share (`data.cache.CachedStream`), and the sharded state is
    re-sharded on load. Returns the two trajectories without the keys that may then change;
    refuses a streamed or stateful run in one line."""
    before, now = saved.get("processes"), current.get("processes")
    if before is None or before == now:
        return saved, current
    if str(current.get("launch.sharding")).startswith("DEEPSPEED"):
        raise HftrainError(f"the run of {where} trained on {before} processes and this launch "
                           f"has {now}: DeepSpeed's ZeRO checkpoints load only on the number "
                           "of processes that saved them")
    if any(key.startswith("data.sources[") for key in current):
        raise HftrainError(f"the run of {where} trained on {before} processes and this launch "
                           f"has {now}: a mixture resumes only on the processes it started "
                           "with (each rank draws its own blocks from the sources)")
    if not current.get("data.cache") or current.get("train.stateful"):
        what, other = (("a stateful run", "its recurrent lanes are split over them")
                       if current.get("train.stateful") else
                       ("a streamed run", "with data.cache a run may change their number"))
        raise HftrainError(
            f"the run of {where} trained on {before} processes and this launch has {now}: "
            f"{what} resumes only on the processes it started with (each rank's data "
            f"position is its own; {other})")
    global_before = saved.get("train.batch_size", 0) * before
    if current.get("train.batch_size", 0) * now != global_before:
        raise HftrainError(
            f"the run of {where} trained with a global batch of {global_before} blocks "
            f"({before} processes x train.batch_size {saved.get('train.batch_size')}); on {now} "
            f"processes set train.batch_size={global_before // now} to keep it")
    drop = ("processes", "train.batch_size")
    return ({k: v for k, v in saved.items() if k not in drop},
            {k: v for k, v in current.items() if k not in drop})
