"""The processes that read and tokenize data: where they start, what they import, and how
they end with their training process.

Kept apart from the loader and free of heavy imports: `hftrain train` starts the fork server
from here before it imports torch and transformers itself, so that the server's imports (and
the first worker's) overlap the training process's start instead of delaying its first batch.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from typing import Any

from hftrain.errors import HftrainError

WORKER_MODULES = ("__main__", "hftrain.data.loader", "transformers.tokenization_utils_tokenizers")
"""What the fork server imports once, so that no worker imports it: the main module (as
`spawn` does), the loader, and the module of the tokenizer class each worker unpickles (a
name that is gone in some release is skipped by the server). The loader must stay light:
what it imports, every run's server does (1 s for torch; transformers' model classes would
add 2 s, which is why `hftrain.models` imports them only to build a model)."""


def worker_context() -> Any:
    """Where workers start: a fork server, never a fork of the training process.

    The training process has threads (gloo's, the loader's queue feeders, the pin-memory
    thread), and a fork copies whatever lock one of them held: a worker forked at the wrong
    moment hung inside `fork` for ever, and its trainer with it (seen in the two-node test,
    1 run in 14 on 2 CPUs). POSIX allows a forked child of a threaded process only
    async-signal-safe calls; Python 3.14 made the fork server its default for this reason.
    The server is a fresh single-threaded process that imports this module (and the main
    module, as `spawn` does: a script that starts training needs the `if __name__ ==
    "__main__":` guard, as for torch's DataLoader on macOS and Windows) once; each worker is
    forked from it, and gets the dataset pickled."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(WORKER_MODULES))
    return context


def check_not_a_worker() -> None:
    """Refuse to train inside a data worker's start: a script without the `if __name__ ==
    "__main__":` guard is imported again by each worker (and the fork server), which would
    train again there (under torchrun: hang joining the process group). multiprocessing
    marks a process importing its parent's main module as `_inheriting`, and refuses to
    start processes from it the same way."""
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise HftrainError("training was started while a data worker imported the main "
                           "script; put the script's code under `if __name__ == "
                           "\"__main__\":` (data workers import it, as on macOS and Windows)")


def start_worker_server() -> None:
    """Start the fork server now, in the background: its imports (torch, tokenizers: seconds)
    then overlap the training process's own start instead of delaying the first batch."""
    import multiprocessing.forkserver

    worker_context()
    multiprocessing.forkserver.ensure_running()



def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as under taskset or a batch
    scheduler; the machine's count where the platform does not say)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def worker_count(requested: int) -> int:
    """Workers a loader starts for `data.num_workers`: at most one per usable CPU. Reading
    and tokenizing is CPU-bound, so more never help, and each worker is a process: a typo
    of 1000000 would fork until the machine runs out of memory. The batches do not depend
    on the count."""
    return min(requested, usable_cpus())



def worker_init(_: int, trainer: int) -> None:
    """Workers tokenize one piece at a time on one thread: the parallelism is the workers
    (and the Rust tokenizer must not start a thread pool in a forked process).

    A worker dies with the training process (`_exit_with`) and, on Linux, with its parent, the
    fork server (`worker_context`). Without this, a worker whose trainer was killed (kill -9,
    the OOM killer) can hang for ever at exit, flushing pieces into a queue nobody reads,
    holding its memory and the job's output pipes open."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Ctrl-C and SIGTERM reach the whole process group: the training process handles them
    # (finishes the step, checkpoints, stops its workers); a worker must not die of them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    threading.Thread(target=_exit_with, args=(trainer,), daemon=True,
                     name="hftrain-trainer-watch").start()


def _exit_with(trainer: int) -> None:
    """Exit this worker when the training process exits. Its parent is the fork server, and
    torch's own watchdog watches only the parent; the server in turn waits for every worker
    to close the trainer's liveness pipe, which each inherits: without this, a worker of a
    trainer killed with -9 and its server live on, holding the job's output pipes open."""
    try:
        watched = os.pidfd_open(trainer)
    except (AttributeError, OSError):  # not Linux >= 5.3, or the trainer is already gone
        watched = None
    if watched is not None:
        select.select([watched], [], [])  # readable once it has exited, reaped or not
    else:
        while _alive(trainer):
            time.sleep(1.0)
    os._exit(0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone (or the pid reused by another user)
        return False
    return True


