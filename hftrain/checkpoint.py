"""Checkpoints: the run's whole resumable state as one object of parts (`Checkpointer`), written
atomically, checked on load, the last K kept.

A checkpoint is `<run>/checkpoints/step-00000120/`:

- Accelerate's part, what `accelerator.save_state` writes: the weights (safetensors), the
  optimizer and every process's RNG states. Accelerate reads the last two back with
  `torch.load(weights_only=True)`, which refuses to run code hidden in a pickle. hftrain
  registers nothing with `register_for_checkpointing`: Accelerate loads such objects with
  `weights_only=False`. Under FSDP the weights and the optimizer are torch distributed-
  checkpoint folders (`pytorch_model_fsdp_0/`, `optimizer_0/`: each rank's shards and a
  `.metadata`), which `unsafe_distributed_checkpoint` reads with a restricted unpickler before
  Accelerate does; DeepSpeed's files are read with `weights_only` first.
- `rank{N}_state.safetensors`: the tensors of every other part on process N (the loss of the
  current log window, the recurrent state, the data position), as `part/key`.
- `hftrain_state.json`, written last: the step, the number of processes, what defines the
  run's trajectory (see `hftrain.resume`), every part's plain values (`parts`: the schedule,
  the loop's counters, how many metrics.jsonl records belong to the run, the data files'
  fingerprints) and a manifest of every other file, nested ones included, with its size and
  SHA-256.

The folder is written under a temporary name and renamed only when complete, so a crash while
saving never leaves a half checkpoint where `newest_intact_checkpoint` would look, and never
touches the previous one. On resume the manifest is checked before anything is loaded: a
truncated, missing, altered or unreadable file (or one reached through a link) marks the
checkpoint damaged, and the newest intact one before it is used instead.

The data position is stored, not replayed, so a resume reads at most one piece per process
however late the step. A token-cache run saved on N processes may be loaded on M (each
part's `merge_ranks`).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from hftrain.atomic import WRITE_ERRORS, replace_directory, write_error_reason
from hftrain.errors import HftrainError, one_line

STATE_FILE = "hftrain_state.json"
RANK_TENSORS = "state.safetensors"
_NAME = re.compile(r"^step-(\d{8})$")
_STALE = re.compile(r"^\.step-\d{8}\.(tmp|old)$")


class CheckpointError(HftrainError):
    """A checkpoint could not be written (full disk, read-only folder) or read."""


def is_checkpoint_name(name: str) -> bool:
    """`step-00000120`: the only folder name hftrain gives a checkpoint."""
    return bool(_NAME.match(name))


def checkpoints_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints whose state file was written (the last step of a save), oldest first."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None. Temporary folders are never complete."""
    complete = complete_checkpoints(run_dir)
    return complete[-1] if complete else None


def newest_intact_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that passes `damage`; each damaged newer one gets a warning."""
    for path in reversed(complete_checkpoints(run_dir)):
        problem = damage(path)
        if problem is None:
            return path
        print(f"hftrain: warning: skipping damaged checkpoint {path}: {problem}",
              file=sys.stderr)
    return None


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state file: `step`, `processes`, `trajectory`, `parts`, `files`."""
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))


COUNTERS = ("step", "tokens_seen", "micro_batches", "skipped_steps", "window_tokens")
"""The loop counters every state file holds (`parts.loop`), each an integer >= 0."""


def state_digest(state: dict[str, Any]) -> str:
    """SHA-256 of the state file's content less the digest itself (canonical JSON)."""
    body = {k: v for k, v in state.items() if k != "state_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def damage(path: Path) -> str | None:
    """What is wrong with a checkpoint, or None when every file is as it was written: the state
    file parses, matches its own digest and the folder's step, and every file it lists has
    the size and SHA-256 it was written with."""
    try:
        state = read_state(path)
    except (OSError, ValueError) as exc:
        return f"{STATE_FILE} is unreadable ({type(exc).__name__})"
    if not isinstance(state, dict) or state.get("state_sha256") != state_digest(state):
        return f"{STATE_FILE} was altered after it was written"
    problem = _inconsistent(state, path.name)
    if problem:
        return problem
    files = state["files"]
    if not all(_inside(name) for name in files):
        return f"{STATE_FILE} lists a file outside the checkpoint folder"
    for name, expected in files.items():
        file = path / name
        linked = any((path / part).is_symlink() for part in _prefixes(name))
        if not file.is_file() or linked:
            return f"{name} is missing" if not linked else f"{name} is reached through a link"
        size = file.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, {expected['size']} were written"
    digests = _sha256_all([path / name for name in files])
    for name, expected in files.items():
        if digests[path / name] != expected["sha256"]:
            return f"{name} was altered after it was written (SHA-256 differs)"
    return (unsafe_distributed_checkpoint(path, set(files)) or unsafe_deepspeed_files(path)
            or unreadable_random_states(path))


def _inconsistent(state: dict[str, Any], name: str) -> str | None:
    """What in a (digest-checked) state file contradicts itself or its folder's name."""
    parts, files = state.get("parts"), state.get("files")
    parts = parts if isinstance(parts, dict) else {}
    loop, metrics = parts.get("loop"), parts.get("metrics")
    counters_ok = isinstance(loop, dict) and all(
        type(loop.get(k)) is int and loop[k] >= 0 for k in COUNTERS) \
        and isinstance(metrics, dict) and type(metrics.get("lines")) is int \
        and metrics["lines"] >= 0
    if not counters_ok or not isinstance(files, dict) or not files \
            or not all(isinstance(parts.get(k), dict) for k in ("scheduler", "data_files")) \
            or not isinstance(state.get("trajectory"), dict) or not state["trajectory"]:
        return f"{STATE_FILE} lacks the counters, trajectory or file list a checkpoint holds"
    processes = state.get("processes")
    if type(processes) is not int or processes < 1 \
            or processes != state["trajectory"].get("processes", processes) \
            or not all(rank_tensors_file(r) in files for r in range(processes)):
        return "its number of processes does not match its files"
    if name != f"step-{loop['step']:08d}" or state.get("step") != loop["step"]:
        return f"it holds step {loop['step']}, not the step its name says"
    accumulation = state["trajectory"].get("train.grad_accum_steps")
    if type(accumulation) is not int or loop["micro_batches"] != loop["step"] * accumulation:
        return "its data position does not match its step"
    if not all(isinstance(e, dict) and type(e.get("size")) is int for e in files.values()):
        return f"{STATE_FILE} lists its files without their sizes and digests"
    return None


def _prefixes(name: str) -> list[str]:
    """`a`, `a/b`, `a/b/c` for `a/b/c`: each folder on the way to a file, and the file."""
    parts = Path(name).parts
    return [str(Path(*parts[:i])) for i in range(1, len(parts) + 1)]


def unreadable_random_states(path: Path) -> str | None:
    """Accelerate reads each process's `random_states_N.pkl` with `weights_only=True` and, if
    that fails, goes on without a word from a fresh random state (the resumed run then
    differs from the uninterrupted one). Read them here first, with Accelerate's own loader:
    one that does not load marks the checkpoint damaged."""
    from accelerate.utils.other import load as accelerate_load

    for file in sorted(path.glob("random_states_*.pkl")):
        try:
            accelerate_load(file)
        except Exception as exc:  # noqa: BLE001 - whatever a planted file raises: one line
            return (f"{file.name} does not load as random states "
                    f"({one_line(exc)})")
    return None


def manifest_names(folder: Path) -> list[str]:
    """Every file under `folder`, nested ones included (a sharded save writes folders:
    FSDP's `pytorch_model_fsdp_0/`, `optimizer_0/`), as POSIX paths relative to it. A
    symbolic link is listed too, so that `damage` refuses it rather than follow it."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() or p.is_symlink())


def _inside(name: Any) -> bool:
    parts = Path(name).parts if isinstance(name, str) else ("..",)
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts


def unsafe_distributed_checkpoint(path: Path, listed: set[str]) -> str | None:
    """Why a torch distributed checkpoint (DCP) folder in `path` cannot be read safely, or None.

    DCP reads its `.metadata` with a bare `pickle.load`, and the non-tensor values of a state
    dict (optimizer step counts, hyperparameters) with `torch.load(weights_only=False)`: a
    planted pickle would run. Before Accelerate reads a folder, the metadata is unpickled here
    with only DCP's own record classes, `torch.Size`, dtypes, layouts and paths allowed
    (pickle's documented "restricting globals"), and every non-tensor value is loaded with
    `weights_only=True`. What passes holds no other callable, so DCP's own unrestricted read
    of the same bytes runs nothing else. Every file the metadata points to must be one the
    manifest lists (`listed`, relative to `path`), so each was checked against its digest.
    """
    for metadata_file in sorted(path.rglob(".metadata")):
        folder = metadata_file.parent.relative_to(path)
        try:
            if (folder / ".metadata").as_posix() not in listed:
                raise ValueError("its .metadata is not in the manifest")
            with metadata_file.open("rb") as f:
                metadata = _DcpMetadataUnpickler(f).load()
            _check_storage(metadata_file.parent, folder, metadata, listed)
        except Exception as exc:  # noqa: BLE001 - whatever a planted file raises: one line
            return f"{folder.as_posix()} is not a distributed checkpoint hftrain can read safely " \
                   f"({one_line(exc)})"
    return None


DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
"""The classes besides tensors in DeepSpeed's ZeRO checkpoint files (`pytorch_model/*.pt`)."""


def unsafe_deepspeed_files(path: Path) -> str | None:
    """Why a DeepSpeed checkpoint file in `path` cannot be read safely, or None.

    DeepSpeed loads its `*.pt` files with `torch.load(weights_only=False)`. Each is loaded
    here first with `weights_only=True`, allowing only the few DeepSpeed classes its files
    hold (`DEEPSPEED_GLOBALS`): what passes runs nothing when DeepSpeed reads it again.
    (Memory-mapped: a file's tensors are not all read into memory.)
    """
    files = sorted(path.rglob("*.pt"))
    if not files:
        return None
    import importlib

    allowed = []
    for name in DEEPSPEED_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            allowed.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            continue  # deepspeed missing or changed: its classes are refused below
    for file in files:
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(file, weights_only=True, map_location="cpu", mmap=True)
        except Exception as exc:  # noqa: BLE001 - whatever a planted file raises: one line
            return (f"{file.relative_to(path).as_posix()} cannot be read safely "
                    f"({one_line(exc)})")
    return None


DCP_RECORDS = {
    "torch.distributed.checkpoint.metadata": (
        "Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING"),
    "torch.distributed.checkpoint.filesystem": ("_StorageInfo",),
    "pathlib": ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"),
    "pathlib._local": ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"),
}
"""The classes a DCP `.metadata` is made of, by exact name (plus `torch.Size`, dtypes and
`torch.serialization._get_layout`, which turns a layout's name into the layout)."""


class _DcpMetadataUnpickler(pickle._Unpickler):
    """Unpickles DCP's `.metadata` and nothing else (see `unsafe_distributed_checkpoint`).

    The pure-Python unpickler, so that BUILD can be checked too: BUILD on a class object
    would set attributes on the class itself (monkeypatch `Path` for the whole process)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        import importlib

        import torch.serialization

        if name in DCP_RECORDS.get(module, ()):
            found = getattr(importlib.import_module(module), name)
            if isinstance(found, type):
                return found
        if module == "torch" and name == "Size":
            return torch.Size
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) == ("torch.serialization", "_get_layout"):
            return torch.serialization._get_layout
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")

    def load_build(self) -> None:
        if isinstance(self.stack[-2], type):
            raise pickle.UnpicklingError("BUILD on a class is not allowed in DCP metadata")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def _check_storage(folder: Path, relative: Path, metadata: Any, listed: set[str]) -> None:
    """Every file the metadata points to lies in the folder and is in the manifest; every
    non-tensor value loads with `weights_only=True`."""
    import io

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    byte_fqns = {fqn for fqn, meta in metadata.state_dict_metadata.items()
                 if isinstance(meta, BytesStorageMetadata)}
    for index, info in (metadata.storage_data or {}).items():
        name = str(info.relative_path)
        if not _inside(name) or (relative / name).as_posix() not in listed:
            raise ValueError(f"{index.fqn} is stored in {name}, which the manifest does not list")
        if getattr(info, "transform_descriptors", None):
            raise ValueError(f"{index.fqn} is stored with transforms hftrain does not read")
        if index.fqn not in byte_fqns:
            continue
        with (folder / name).open("rb") as f:
            f.seek(info.offset)
            torch.load(io.BytesIO(f.read(info.length)), weights_only=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)  # hashlib releases the GIL on large buffers
    return digest.hexdigest()


def _sha256_all(paths: list[Path]) -> dict[Path, str]:
    """SHA-256 of several files on threads: the weights and the optimizer state (1/3 and 2/3
    of a checkpoint) hash side by side, ~0.4 s for GPT-2 124M instead of ~0.8 s."""
    with ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1) or 1) as pool:
        return dict(zip(paths, pool.map(file_sha256, paths), strict=True))


class Checkpointer:
    """Saves and restores a run's whole resumable state as one object (torchtitan's
    `CheckpointManager(states=...)`, litgpt's `state` dict): Accelerate's part (the model and
    optimizer, in the format FSDP and DeepSpeed shard them, and every process's RNG states,
    through `save_state`) and named Stateful parts (`state_dict()` / `load_state_dict()`: the
    schedule, the loop's counters, the data position, the metrics position). Each part's
    state dict is split by value: tensors go to this process's `rank{N}_state.safetensors`
    (as `part/key`), everything else, which must be JSON and the same on every process, to
    the state file rank 0 writes. A part that defines `merge_ranks(saved, rank)` may be
    loaded on another number of processes than saved it; the others then get rank 0's
    tensors (`resume.plan_run` lets only token-cache runs change the number).
    """

    def __init__(self, accelerator: Accelerator, run_dir: Path, parts: dict[str, Any]) -> None:
        self.accelerator, self.run_dir, self.parts = accelerator, run_dir, parts
        self.latest: Path | None = None
        """The newest complete checkpoint this run saved or resumed from."""
        self._pending: Future[Path] | None = None
        self._finisher: ThreadPoolExecutor | None = None

    def save(self, step: int, trajectory: dict[str, Any], keep: int,
             background: bool = False) -> Path:
        """Write the checkpoint of `step` on every process; keep the newest `keep`.

        The files are written before this returns; with `background` (one process only), the
        manifest's hashing, the rename that completes the checkpoint and the pruning then go
        on in a thread while training continues: hashing GPT-2 124M's 1.5 GB is as long as
        Accelerate's `save_state` itself. Until renamed the checkpoint is a `.step-N.tmp`
        folder a resume never reads, so a crash before then falls back to the one before.
        `wait()` (called by the next save, and before the run ends) raises what failed.

        A write that fails (a full disk, say) removes its temporary folder and raises
        CheckpointError naming the run's last good checkpoint, which is untouched.
        """
        self.wait()
        acc, root = self.accelerator, checkpoints_root(self.run_dir)
        target = root / f"step-{step:08d}"
        tmp = root / f".{target.name}.tmp"
        values, tensors = self._split()
        try:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            acc.wait_for_everyone()
            acc.save_state(str(tmp))
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()},
                      tmp / rank_tensors_file(acc.process_index))
            acc.wait_for_everyone()
        except WRITE_ERRORS as exc:  # a full disk, a read-only folder
            raise self._failed(tmp, target, exc) from None
        state = {"step": step, "processes": acc.num_processes, "trajectory": trajectory,
                 "parts": values}
        if not acc.is_main_process:
            acc.wait_for_everyone()  # until the main process has completed it
            self.latest = target
        elif background and acc.num_processes == 1:
            self._finisher = self._finisher or ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="hftrain-checkpoint")
            self._pending = self._finisher.submit(self._complete, tmp, target, state, keep)
        else:
            self._complete(tmp, target, state, keep)
            acc.wait_for_everyone()
        return target

    def wait(self) -> Path | None:
        """Let a checkpoint still completing in the background finish; returns the newest
        complete checkpoint, or raises the CheckpointError of a save that failed. A wait cut
        short (Ctrl-C) leaves the save pending, for the next wait to finish."""
        pending = self._pending
        if pending is not None:
            try:
                pending.result()
            finally:
                if pending.done():
                    self._pending = None
        return self.latest

    def _complete(self, tmp: Path, target: Path, state: dict[str, Any], keep: int) -> Path:
        """The main process's last steps of a save: the state file with the manifest, the
        rename, the pruning of older checkpoints (whose failure is a warning: the new
        checkpoint is complete by then)."""
        try:
            _write_state_file(tmp, state)
            replace_directory(target, tmp)  # the same step saved again replaces it
        except WRITE_ERRORS as exc:
            raise self._failed(tmp, target, exc) from None
        self.latest = target
        try:
            _prune(target, keep)
        except OSError as exc:
            print(f"hftrain: warning: could not prune old checkpoints beside {target}: "
                  f"{write_error_reason(exc)}", file=sys.stderr)
        return target

    def _failed(self, tmp: Path, target: Path, exc: Exception) -> CheckpointError:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"{self.latest} is intact" if self.latest else "there is no earlier checkpoint"
        return CheckpointError(f"could not write checkpoint {target} "
                               f"({write_error_reason(exc)}); {kept}")

    def _split(self) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
        """Every part's state dict as (JSON values by part, tensors as `part/key`)."""
        values: dict[str, dict[str, Any]] = {}
        tensors: dict[str, torch.Tensor] = {}
        for name, part in self.parts.items():
            values[name] = {}
            for key, value in part.state_dict().items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{name}/{key}"] = value
                else:
                    values[name][key] = value
        return values, tensors

    def load(self, path: Path) -> dict[str, Any]:
        """Restore every part from `path` (checked with `damage` first); returns its state
        file."""
        acc, state = self.accelerator, read_state(path)
        try:
            acc.load_state(str(path))
            tensors = self._rank_tensors(path, state["processes"])
            for name, part in self.parts.items():
                prefix = f"{name}/"
                mine = {k[len(prefix):]: v.to(acc.device) for k, v in tensors.items()
                        if k.startswith(prefix)}
                part.load_state_dict({**state["parts"].get(name, {}), **mine})
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        except HftrainError:  # the data or metrics.jsonl as they are now: not the checkpoint
            raise
        except Exception as exc:  # noqa: BLE001 - anything a damaged file raises: one line
            raise CheckpointError(f"cannot load checkpoint {path}: {one_line(exc)}") from None
        self.latest = path
        return state

    def _rank_tensors(self, path: Path, saved_processes: int) -> dict[str, torch.Tensor]:
        """This process's tensors; from another number of processes, each part's
        `merge_ranks` of every saved rank's (or rank 0's)."""
        rank = self.accelerator.process_index
        if saved_processes == self.accelerator.num_processes:
            return load_file(path / rank_tensors_file(rank))
        saved = [load_file(path / rank_tensors_file(r)) for r in range(saved_processes)]
        merged = dict(saved[0])
        for name, part in self.parts.items():
            if hasattr(part, "merge_ranks"):
                prefix = f"{name}/"
                each = [{k[len(prefix):]: v for k, v in s.items() if k.startswith(prefix)}
                        for s in saved]
                merged.update({prefix + k: v for k, v in part.merge_ranks(each, rank).items()})
        return merged


def rank_tensors_file(rank: int) -> str:
    return f"rank{rank}_{RANK_TENSORS}"


def _write_state_file(folder: Path, state: dict[str, Any]) -> None:
    """The state file, written last: `state`, a manifest of every other file in `folder`
    (nested ones included) with its size and SHA-256, and the digest of it all."""
    paths = [folder / name for name in manifest_names(folder)]
    digests = _sha256_all(paths)
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size,
                                                "sha256": digests[p]} for p in paths}
    record = {**state, "files": files}
    record["state_sha256"] = state_digest(record)
    (folder / STATE_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")


def _prune(saved: Path, keep: int) -> None:
    """Keep `saved` and the `keep - 1` complete checkpoints before it; remove older ones and
    the folders left by killed saves (only the lock holder saves, so no other process writes
    them). Checkpoints *after* `saved` (damaged ones a resume skipped) are left alone: they
    must never push out the run's good ones, and the run replaces them as it reaches their
    steps. Anything else (a symbolic link, a `step-N` folder without a state file) was not
    made by hftrain and is left alone. A removal that fails is a warning: `saved` is written."""
    root = saved.parent
    complete = [p for p in complete_checkpoints(root.parent)
                if not p.is_symlink() and p.name <= saved.name]
    stale = [p for p in root.iterdir() if _STALE.match(p.name) and not p.is_symlink()]
    for old in [*complete[:-keep], *stale]:
        try:
            shutil.rmtree(old)
        except OSError as exc:
            print(f"hftrain: warning: could not remove old checkpoint {old}: {exc.strerror}",
                  file=sys.stderr)
