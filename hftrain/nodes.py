"""Several nodes: the recipe and the folders every process must see as one.

Only the main process (global rank 0) renames a finished checkpoint folder, prunes old ones
and writes the manifest; every other process writes its own files into the same folders (its
RNG state, its tensors of the run's state, its DCP shards). On node-local disks the other
nodes' files land in folders rank 0 never sees: their checkpoints never complete and a resume
fails. Rather than find that out at the first checkpoint (or the first resume), every process
checks at start that it sees a file the main process has just written in `run.output_dir`,
and the run is refused in one line if one does not.

The token cache may live on node-local disks (fast local NVMe is where it belongs): it is
built once per filesystem, by the lowest-ranked node-main process that sees it, while every
other process waits (for the slowest node's build); then the builders' caches are compared
token for token (by their SHA-256), so that nodes holding different copies of the data are
refused instead of training on them. Checks that read each node's own disk run on every
process and are refused together (`on_every_process`), so no node is left waiting.
"""

from __future__ import annotations

import json
import secrets
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from hftrain.errors import HftrainError, ReportedByMainProcess, one_line
from hftrain.launch import refuse

PROBE_PREFIX = ".hftrain-shared-"
"""The probe files' names: a probe a killed process left behind is no one's data."""


def check_same_recipe(accelerator: Any, recipe: dict[str, Any]) -> None:
    """Refuse (every process, rank 0 with the one line) when the processes were started with
    different recipes or overrides: each node's agent is its own command line, and a rank
    trained at another learning rate, or for another number of steps, would write its shard
    into a run whose recipe.yaml says otherwise, or stop in a collective the others never
    reach."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import gather_object

    from hftrain.recipe import flatten

    mine = {key: repr(value) for key, value in flatten(recipe).items()}
    every = gather_object([mine])
    differing = sorted({key for other in every for key in set(other) | set(every[0])
                        if other.get(key) != every[0].get(key)})
    if not differing:
        return
    ranks = [rank for rank, other in enumerate(every) if other != every[0]]
    message = (f"the {accelerator.num_processes} processes were started with different "
               f"recipes: rank {ranks[0]} differs from rank 0 in {', '.join(differing)}; "
               "give every node the same recipe file and overrides")
    refuse(message, accelerator.is_main_process)


def existing_ancestor(path: Path) -> Path:
    """`path` or its nearest existing parent: the run folder may not exist yet, and nothing
    of the run is written before every input is checked."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_shared(accelerator: Any, folders: dict[str, Path]) -> None:
    """Refuse (every process, rank 0 with the one line) when some process does not see the
    main process's files in one of `folders` (`{"run.output_dir": path, ...}`). Writes one
    small probe file per folder for the time of the check, then removes it."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast_object_list

    probes = _write_probes(folders) if accelerator.is_main_process else None
    [probes] = broadcast_object_list([probes], from_process=0)
    try:  # each process looks where *it* resolves the folder (a relative path, its own cwd)
        flags = torch.tensor([not _sees(folders[key], name, token)
                              for key, (name, token) in probes.items()],
                             dtype=torch.float32, device=accelerator.device)
        missing = accelerator.reduce(flags, reduction="max").tolist()
    finally:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for key, (name, _) in probes.items():
                if name is not None:
                    (existing_ancestor(folders[key]) / name).unlink(missing_ok=True)
    keys = [key for key, flag in zip(probes, missing, strict=True) if flag]
    if not keys:
        return
    where = " and ".join(f"{key} '{folders[key]}'" for key in keys)
    message = (f"{where} must be on a filesystem every node shares: some of the "
               f"{accelerator.num_processes} processes do not see the files the main process "
               f"(on {socket.gethostname()}) writes there; put it on shared storage (NFS, "
               "Lustre, ...) or run on one node")
    refuse(message, accelerator.is_main_process)


def builds_token_cache(accelerator: Any, cache: Path) -> bool:
    """Whether this process builds the token cache `cache`: one process per filesystem holding
    it. Each node's main process (local rank 0) writes a probe file there; a node-main process
    builds unless it sees the probe of a lower-ranked node-main process (the folder is then
    shared with that node). One node or a shared folder: global rank 0 alone builds."""
    if accelerator.num_processes == 1:
        return True
    from accelerate.utils import gather_object

    node_main = accelerator.local_process_index == 0
    probe = _write_probes({"data.cache": cache})["data.cache"] if node_main else None
    try:
        probes = gather_object([(accelerator.process_index, probe)])
        if not node_main:
            return False
        if probe[0] is None:  # not writable: its own build fails with the reason
            return True
        return not any(_sees(cache, *other) for rank, other in probes
                       if other is not None and other[0] is not None
                       and rank < accelerator.process_index)
    finally:
        accelerator.wait_for_everyone()  # every process has looked before a probe goes
        if probe is not None and probe[0] is not None:
            (existing_ancestor(cache) / probe[0]).unlink(missing_ok=True)


LONG_WORK_TIMEOUT = timedelta(hours=24)
"""How long the other processes wait for the token cache to be built."""


def build_once_per_filesystem(accelerator: Any, builds: bool, build: Callable[[], Any]) -> None:
    """Run `build()` on the processes that `builds` (one per filesystem); every process then
    waits for all of them on a gloo group of its own whose timeout is LONG_WORK_TIMEOUT (a
    process group's timeout is fixed when it is made: 10 min on NCCL, and tokenizing a large
    corpus takes hours). A builder's refusal is said by rank 0 in one line (naming the host
    when it was another node's), and builders that produced different results (different
    copies of the data on different nodes) are refused."""
    outcome: tuple[str, str | None, Any] = (socket.gethostname(), None, None)
    if builds:
        try:
            outcome = (outcome[0], None, build())
        except Exception as exc:  # noqa: BLE001 - the others would wait 24 h for this one
            if accelerator.num_processes == 1:
                raise
            if not isinstance(exc, HftrainError):  # a bug: its traceback here, one line there
                traceback.print_exc()
            outcome = (outcome[0], one_line(exc), None)
    if accelerator.num_processes == 1:
        return
    group = torch.distributed.new_group(backend="gloo", timeout=LONG_WORK_TIMEOUT)
    every: list[Any] = [None] * accelerator.num_processes
    try:
        torch.distributed.all_gather_object(every, [builds, *outcome], group=group)
    finally:
        torch.distributed.destroy_process_group(group)
    _refuse_failed_or_different_builds(accelerator, every)


def _refuse_failed_or_different_builds(accelerator: Any, every: list[Any]) -> None:
    built = [(rank, host, error, result) for rank, (builds, host, error, result)
             in enumerate(every) if builds]
    _refuse_first_error(accelerator, [(host, error) for _, host, error, _ in every])
    results: dict[str, tuple[int, str]] = {}
    for rank, host, _, result in built:  # the lowest rank of each copy
        results.setdefault(json.dumps(result, sort_keys=True), (rank, host))
    if len(results) > 1:
        where = ", ".join(f"{host} (rank {rank})" for rank, host in results.values())
        refuse(f"data.cache: the token caches built on {where} differ, so the nodes hold "
               "different copies of the data; give every node the same data files",
               accelerator.is_main_process)


def on_every_process(accelerator: Any, work: Callable[[], Any]) -> Any:
    """`work()` on every process, for checks that read each node's own disk (a data file, the
    token cache): when it refuses on some processes only, the others would go on into the
    next collective and hang there. Every process learns whether any refused, and rank 0
    says the first refusal in one line (naming the host and rank when it was not its own)."""
    if accelerator.num_processes == 1:
        return work()
    from accelerate.utils import gather_object

    result, error = None, None
    try:
        result = work()
    except HftrainError as exc:
        error = str(exc)
    _refuse_first_error(accelerator, gather_object([(socket.gethostname(), error)]))
    return result


def on_main_process(accelerator: Any, decide: Callable[[], Any]) -> Any:
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


def on_main_process_within(accelerator: Any, work: Callable[[], Any],
                           timeout: timedelta) -> Any:
    """`work()` on the main process while the others wait for it, up to `timeout` (on a gloo
    group of its own: the run's process group times out sooner, 10 min on NCCL); every
    process gets its result. A failure is raised on the main process as it was and as
    `ReportedByMainProcess` (its one line) on the others; a wait past `timeout` fails the
    waiting processes with the process group's timeout error."""
    if accelerator.num_processes == 1:
        return work()
    result = error = failure = None
    if accelerator.is_main_process:
        try:
            result = work()
        except Exception as exc:  # noqa: BLE001 - the others learn of it, then it is raised
            failure, error = exc, one_line(exc)
    group = torch.distributed.new_group(backend="gloo", timeout=timeout)
    shared = [result, error]
    try:
        torch.distributed.broadcast_object_list(shared, src=0, group=group)
    finally:
        torch.distributed.destroy_process_group(group)
    result, error = shared
    if failure is not None:
        raise failure
    if error is not None:
        raise ReportedByMainProcess(error)
    return result


def any_process(accelerator: Any, flags: tuple[bool, ...], sync_point: bool) -> tuple[bool, ...]:
    """Each flag true where it is true on any process, so that all act after the same step
    (stop, save). With several GPU processes they agree only at `sync_point`s (a collective
    the host waits for is a synchronisation; elsewhere every flag is False); on CPU, where
    waiting costs nothing, every time."""
    if accelerator.num_processes == 1:
        return flags
    if not sync_point and accelerator.device.type != "cpu":
        return tuple(False for _ in flags)
    values = torch.tensor([float(f) for f in flags], device=accelerator.device)
    return tuple(bool(v) for v in accelerator.reduce(values, "max").tolist())


def _refuse_first_error(accelerator: Any, errors: list[tuple[str, str | None]]) -> None:
    """Refuse on every process when some process's entry (`(host, error)` by rank) holds one."""
    failed = [(rank, host, error) for rank, (host, error) in enumerate(errors)
              if error is not None]
    if failed:
        rank, host, error = failed[0]
        refuse(error if rank == 0 else f"on {host} (rank {rank}): {error}",
               accelerator.is_main_process)


def _write_probes(folders: dict[str, Path]) -> dict[str, tuple[str | None, str]]:
    """`{key: (file name, token)}`: one probe file per folder, in its nearest existing
    ancestor, holding a random token; no name where it cannot be written (the run's own
    write then fails with its own message)."""
    probes: dict[str, tuple[str | None, str]] = {}
    for key, folder in folders.items():
        token = secrets.token_hex(16)
        name = f"{PROBE_PREFIX}{token}"
        try:
            (existing_ancestor(folder) / name).write_text(token, encoding="utf-8")
        except OSError:
            probes[key] = (None, token)
            continue
        probes[key] = (name, token)
    return probes


def _sees(folder: Path, name: str | None, token: str) -> bool:
    if name is None:
        return True
    try:
        return (existing_ancestor(folder) / name).read_text(encoding="utf-8") == token
    except OSError:
        return False
