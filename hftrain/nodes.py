"""Several nodes: the recipe and the folders every process must see as one.

Only the main process (global rank 0) renames a finished checkpoint folder, prunes old ones,
writes the manifest and builds the token cache; every other process writes its own files into
the same folders (its RNG state, its loop state, its DCP shards) and reads the cache rank 0
built. On node-local disks the other nodes' files land in folders rank 0 never sees: their
checkpoints never complete and a resume fails, and the cache is missing on them. Rather than
find that out at the first checkpoint (or the first resume), every process checks at start
that it sees a file the main process has just written in the folder, and the run is refused
in one line if one does not.
"""

from __future__ import annotations

import secrets
import socket
from pathlib import Path
from typing import Any

import torch

from hftrain.launch import refuse


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


def _write_probes(folders: dict[str, Path]) -> dict[str, tuple[str | None, str]]:
    """`{key: (file name, token)}`: one probe file per folder, in its nearest existing
    ancestor, holding a random token; no name where it cannot be written (the run's own
    write then fails with its own message)."""
    probes: dict[str, tuple[str | None, str]] = {}
    for key, folder in folders.items():
        token = secrets.token_hex(16)
        name = f".hftrain-shared-{token}"
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
