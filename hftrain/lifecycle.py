"""A run folder's life: check where it goes, plan (start, resume or nothing), lock, start,
finish. `hftrain train`, `hftrain tokenizer` and `hftrain prepare` go through this one object.

The rules it applies live beside it: what hftrain may write and delete (`hftrain.run_folder`:
the marker, the lock, refusing foreign folders), and when a run may be resumed
(`hftrain.resume`: same recipe and launch, intact checkpoints).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hftrain.data import cache as token_cache
from hftrain.errors import HftrainError
from hftrain.launch import launch_trajectory
from hftrain.recipe import Recipe, dump_recipe, expand_globs
from hftrain.resume import Plan, plan_run
from hftrain.run_folder import (
    RunLock,
    check_new_run_target,
    check_ours_or_new,
    check_replaceable,
    check_writable_target,
    clear_run_folder,
    contains,
    has_run,
    is_run_folder,
    write_marker,
)
from hftrain.run_tokenizer import prepare_tokenizer, save_run_tokenizer


class RunFolder:
    """`run.output_dir` of a recipe, from the first check to the finished marker.

    Nothing is written before `start` (or `build_tokenizer`); from `plan` (for a folder that
    already holds a run) or `start` on, this process holds the folder's lock until the
    `with` block ends. Only the main process of a multi-process run locks and writes
    (`main_process`); the others write only their share of a checkpoint.
    """

    def __init__(self, recipe: Recipe, recipe_path: Path | None = None,
                 main_process: bool = True) -> None:
        self.recipe, self.recipe_path = recipe, recipe_path
        self.path = Path(recipe.run.output_dir)
        self.lock = RunLock(self.path, enabled=main_process)

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.lock.release()

    def protected_paths(self) -> list[Path]:
        """The recipe and the local data files: a run folder must never contain them. (A
        run's own recipe.yaml is hftrain's: `hftrain train runs/x/recipe.yaml --resume` is
        fine.)"""
        data = self.recipe.data
        paths = [Path(p) for p in expand_globs(data.local_files())]
        own_recipe = self.path / "recipe.yaml"
        if self.recipe_path and not (own_recipe.exists()
                                     and own_recipe.samefile(self.recipe_path)):
            paths.append(self.recipe_path)
        reused = (self.recipe.model.init_from, self.recipe.tokenizer.name_or_path)
        return paths + [Path(p) for p in reused if p and Path(p).exists()]  # runs start from

    def check_target(self) -> None:
        """`run.output_dir` holds none of the data or the recipe and is not a folder hftrain
        must not write into (checked again at `start`, under the lock)."""
        check_writable_target(self.path, self.protected_paths(), "run.output_dir")

    def check_cache_target(self) -> None:
        """`data.cache` may be rebuilt in place: it must hold none of the data or the recipe,
        and be neither the run folder nor inside it (a run folder holds only run files)."""
        cache = Path(self.recipe.data.cache)
        check_writable_target(cache, self.protected_paths(), "data.cache")
        if contains(self.path, cache) or contains(cache, self.path):
            raise HftrainError(f"data.cache '{cache}' and run.output_dir '{self.path}' overlap;"
                               " give the token cache a folder of its own (e.g. cache/NAME)")
        for alone in self.recipe.data.by_source():
            token_cache.check_target(alone)
        if self.recipe.data.sources:
            self._check_mixture_cache(cache)

    def _check_mixture_cache(self, cache: Path) -> None:
        """A mixture's `data.cache` holds token caches (`NAME/`, one per source, and each
        one's `.NAME.lock`; those of sources since dropped may stay) and nothing else: a
        folder holding anything more is someone else's."""
        if cache.exists() and not cache.is_dir():
            raise HftrainError(f"data.cache '{cache}' is a file, not a folder")

        def is_cache(name: str) -> bool:
            return (cache / name / token_cache.CACHE_RECORD).is_file()

        names = {s.name for s in self.recipe.data.sources}
        foreign = sorted(e.name for e in cache.iterdir()
                         if not (e.name in names or is_cache(e.name)
                                 or e.name.startswith(".") and e.name.endswith(".lock"))
                         ) if cache.is_dir() else []
        if foreign:
            raise HftrainError(f"data.cache '{cache}' holds {foreign[0]}, which is not a "
                               "token cache of this mixture's sources; give the mixture's "
                               "caches a folder of their own (hftrain writes one per source)")

    def plan(self, accelerator: Any) -> Plan:
        """Start, resume or nothing to do (`resume.plan_run`, for this launch); a folder that
        holds a run is locked first, since a writer prunes the checkpoints this reads.
        Writes nothing."""
        if is_run_folder(self.path):
            self.lock.acquire()
        return plan_run(self.recipe, self.path, self.recipe.checkpoint.resume == "auto",
                        launch_trajectory(accelerator))

    def start(self, plan: Plan, tokenizer: Any, tokenizer_built: bool) -> None:
        """Once every input has been checked, under the lock: only now does the run write
        anything. The folder is checked again, since another process may have started a run
        in it after `plan` looked."""
        self.lock.acquire()
        if plan.checkpoint is None and not plan.restart:
            check_new_run_target(self.path, self.recipe.run.overwrite)
            if self.recipe.run.overwrite and is_run_folder(self.path):
                clear_run_folder(self.path)
        check_replaceable(self.path, "final")  # the export replaces it whole at the end
        try:
            if is_run_folder(self.path):  # not finished from now on, until `finish` says so
                write_marker(self.path, finished_step=None)
            if tokenizer_built:
                save_run_tokenizer(tokenizer, self.recipe, self.path / "tokenizer")
            dump_recipe(self.recipe, self.path / "recipe.yaml")  # on resume: the new lengths
        except OSError as exc:  # a full disk before the first step: nothing of the run is lost
            raise HftrainError(f"cannot write the run folder {self.path}: {exc.strerror}") \
                from None

    def finish(self, step: int) -> None:
        """The run is trained, evaluated and exported at `step`: `--resume` has nothing to do."""
        if self.lock.enabled:
            write_marker(self.path, finished_step=step)

    def build_tokenizer(self) -> tuple[Any, Path | None]:
        """For `hftrain tokenizer` and `prepare`, before any run: the recipe's tokenizer, built
        and saved into `tokenizer/` (returned with that folder), or found there (or at
        `tokenizer.name_or_path`) and reused as `train` would (returned with None). A folder
        that holds a run trained with another tokenizer is refused."""
        self.check_target()
        check_ours_or_new(self.path)
        tokenizer, built = prepare_tokenizer(self.recipe)
        if not built:
            return tokenizer, None
        self.lock.acquire()
        if has_run(self.path):
            raise HftrainError(f"{self.path} holds a run trained with its tokenizer; build "
                               "the new one into another run.output_dir")
        folder = self.path / "tokenizer"
        save_run_tokenizer(tokenizer, self.recipe, folder)
        return tokenizer, folder
