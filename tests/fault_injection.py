"""Run `hftrain train` with a fault injected, for the checkpoint tests (a kill -9 needs its
own process). Usage:

    python tests/fault_injection.py RECORD_FILE KILL_AT_STEP KILL_ON_SAVE -- train RECIPE ...

Every optimizer step appends "step digest" to RECORD_FILE (the digest of the micro-batches it
trained on; under torchrun, to RECORD_FILE.rankN). KILL_AT_STEP > 0 sends SIGKILL to this
process at the start of that step, once the checkpoints before it are complete (a checkpoint
completing in the background takes milliseconds here: a kill *during* that is
tests/test_checkpoint.py's, in process); KILL_ON_SAVE > 0 sends it in the middle of that checkpoint
save (after Accelerate's files, before hftrain's completion marker). With the environment
variable SIGNAL_IN=PHASE:SIGNAL (PHASE `final_eval`, `export` or `sample`; SIGNAL `TERM` or
`KILL`) the process sends itself that signal when the phase begins; SIGNAL_IN=stepN:TERM (or
HUP, INT, ...) sends that signal at the start of step N. With KILL_ONCE=MARKER the kill at
KILL_AT_STEP hits only the last rank, and only while MARKER does not exist (it is created
first): a worker that dies once, as under `torchrun --max-restarts`. With PG_TIMEOUT=S the
process group's collectives time out after S seconds; with SLOW_CACHE=S building the token
cache takes S seconds longer.
"""

import hashlib
import os
import signal
import sys

import accelerate

import hftrain.checkpoint
import hftrain.finish
from hftrain.cli import main
from hftrain.train_state import Run


def digest(micro_batches) -> str:
    h = hashlib.sha1()
    for batch in micro_batches:
        h.update(batch["input_ids"].numpy().tobytes())
    return h.hexdigest()[:16]


original_step = Run.optimizer_step


def should_die() -> bool:
    marker = os.environ.get("KILL_ONCE")
    if not marker:
        return True
    last_rank = int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1
    if not last_rank or os.path.exists(marker):
        return False
    open(marker, "x").close()
    return True


def recording_step(self, micro_batches):
    if self.step + 1 == kill_at_step and should_die():
        self.checkpoints.checkpointer.wait()
        os.kill(os.getpid(), signal.SIGKILL)
    phase, _, name = os.environ.get("SIGNAL_IN", "").partition(":")
    if phase == f"step{self.step + 1}":
        os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
    with open(record_file, "a") as f:
        f.write(f"{self.step + 1} {digest(micro_batches)}\n")
    return original_step(self, micro_batches)


saves = 0
original_save_state = accelerate.Accelerator.save_state


def dying_save_state(self, output_dir=None, **kwargs):
    global saves
    result = original_save_state(self, output_dir, **kwargs)
    saves += 1
    if saves == kill_on_save:
        os.kill(os.getpid(), signal.SIGKILL)
    return result


def signal_when(phase: str, original):
    """Wrap `original` so that it first sends the signal SIGNAL_IN names for `phase`."""
    wanted, _, name = os.environ.get("SIGNAL_IN", "").partition(":")

    def wrapper(*args, **kwargs):
        if wanted == phase and (phase != "final_eval" or kwargs.get("max_batches", 0) is None):
            os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
        return original(*args, **kwargs)

    return wrapper


if __name__ == "__main__":  # the data workers' fork server imports this file too
    record_file, kill_at_step, kill_on_save = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: one record per rank
        record_file = f"{record_file}.rank{os.environ['RANK']}"
    argv = sys.argv[sys.argv.index("--") + 1:]
    if os.environ.get("PG_TIMEOUT"):
        import datetime

        import torch.distributed

        original_init = torch.distributed.init_process_group

        def init_with_timeout(*args, **kwargs):
            kwargs["timeout"] = datetime.timedelta(seconds=float(os.environ["PG_TIMEOUT"]))
            return original_init(*args, **kwargs)

        torch.distributed.init_process_group = init_with_timeout

    if os.environ.get("SLOW_CACHE"):
        import time

        import hftrain.data.cache

        original_prepare = hftrain.data.cache.prepare

        def slow_prepare(*args, **kwargs):
            time.sleep(float(os.environ["SLOW_CACHE"]))  # stands for tokenizing a large corpus
            return original_prepare(*args, **kwargs)

        hftrain.data.cache.prepare = slow_prepare

    Run.evaluate = signal_when("final_eval", Run.evaluate)
    hftrain.finish.export = signal_when("export", hftrain.finish.export)
    hftrain.finish.generate_text = signal_when("sample", hftrain.finish.generate_text)
    Run.optimizer_step = recording_step
    accelerate.Accelerator.save_state = dying_save_state
    assert hftrain.checkpoint.Accelerator is accelerate.Accelerator
    main(argv)
