"""Import, on a thread, the modules a run needs only when it finishes.

`hftrain train` scores the model with an `evaluate` module and draws loss.png with matplotlib
only after its last step. Importing them costs ~1.3 s of Python (evaluate pulls transformers'
pipelines and scipy) that would otherwise come after training, on the critical path. While
the training process runs its steps and its final evaluation, the main thread spends most of
its time inside torch kernels, which release the GIL: an import thread started with training
uses that time. Python's import system is thread-safe (a module being imported by the thread
is waited for, not imported twice), so the code that needs a module simply imports it.
"""

from __future__ import annotations

import contextlib
import importlib
import threading

FINISH_MODULES = ("evaluate", "matplotlib.figure", "matplotlib.backends.backend_agg")


def import_in_background(names: tuple[str, ...] = FINISH_MODULES) -> threading.Thread:
    """Start a thread importing `names`. A module that fails to import is left for its real
    import to report (matplotlib is optional: loss.png is then skipped). Not a daemon: a run
    that ends within the second the imports take waits for them rather than leave a thread
    frozen at exit holding a module's import lock."""

    def run() -> None:
        for name in names:
            with contextlib.suppress(Exception):  # the real import reports it, in context
                importlib.import_module(name)

    thread = threading.Thread(target=run, name="hftrain-preload")
    thread.start()
    return thread
