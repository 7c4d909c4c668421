"""Shared fixtures: a small slice of the bundled corpus and a tiny, fast recipe."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every Python process a test starts prints all its threads' stacks on SIGABRT (see
# `communicate_or_dump`), and leaves no core file behind.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")
resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))

REPO = Path(__file__).resolve().parents[1]

DEPENDENCIES = ("torch", "transformers", "datasets", "tokenizers", "accelerate", "evaluate",
                "huggingface_hub", "safetensors", "numpy", "peft", "lm_eval", "deepspeed")


LONGEST_FILES_FIRST = ("test_sharded.py", "test_checkpoint.py", "test_faults.py",
                       "test_data_scale.py", "test_archs.py", "test_benchmarks.py",
                       "test_optimizers.py", "test_lm_eval.py", "test_distributed.py")
"""The files that take longest in CI (2 cores), longest first. `--dist loadfile` hands whole
files to the 2 workers in collection order (`--no-loadscope-reorder`; xdist would otherwise
order them by their number of tests): a long file handed out last runs alone while the other
worker idles, so the long ones go first and the short ones fill the gaps at the end."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file


def pytest_report_header() -> str:
    """The versions the suite runs against, at the top of every run (CI installs the newest
    of each: its log says what was tested)."""
    from importlib.metadata import PackageNotFoundError, version

    def found(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "absent"

    return "hftrain dependencies: " + ", ".join(f"{name} {found(name)}" for name in DEPENDENCIES)
CORPUS = REPO / "recipes" / "data" / "tinyshakespeare.txt"


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (from /proc: Linux only, as the tests that use it)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def native_stacks(pid: int) -> str:
    """Every thread's C stack of process `pid` from gdb, where gdb is installed: what a
    Python stack cannot show (a lock inside `fork`, a collective)."""
    if shutil.which("gdb") is None:
        return ""
    try:
        done = subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt 25"],
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return f"pid {pid}: gdb timed out\n"
    frames = [line for line in done.stdout.splitlines() if line.startswith(("#", "Thread"))]
    return f"=== pid {pid} ===\n" + "\n".join(frames) + "\n"


def communicate_or_dump(proc: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    """`proc.communicate(timeout)`; past the timeout, every process below `proc` (workers,
    DataLoader workers) is sent SIGABRT so that each prints its stacks, and the test fails
    with them: a hang in CI then says where it hung instead of only that it did."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        hung = [*descendants(proc.pid), proc.pid]
        native = "".join(native_stacks(pid) for pid in hung)
        for pid in hung:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGABRT)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"hung past {timeout} s: {proc.args}\n--- native stacks ---\n{native}"
                    f"\n--- stderr (Python stacks) ---\n{(err or '')[-20000:]}\n"
                    f"--- stdout ---\n{(out or '')[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def launches_several_processes(args: list[str]) -> bool:
    """`args` start more than one process: `--nproc_per_node N`, `--nproc-per-node=N`,
    `--num_processes N` with N > 1, or any `--nnodes`."""
    args = [str(a) for a in args]
    for i, arg in enumerate(args):
        flag, _, value = arg.partition("=")
        if flag.replace("-", "_") not in ("__nproc_per_node", "__num_processes", "__nnodes"):
            continue
        value = value or (args[i + 1] if i + 1 < len(args) else "")
        if flag.endswith("nnodes") or (value.isdigit() and int(value) > 1):
            return True
    return False


def on_cpu_if_multi_process(args: list[str], env: dict[str, str] | None) -> dict[str, str] | None:
    """The environment for `args`: a multi-process launch sees no GPU, so it runs as CI runs it,
    on CPU with gloo (on a one-GPU machine every rank past 0 would ask for a GPU that is not
    there, and NCCL refuses two ranks on one GPU). Other commands keep the GPU if there is one."""
    if not launches_several_processes(args):
        return env
    return {**(os.environ if env is None else env), "CUDA_VISIBLE_DEVICES": ""}


def logits_of(model, input_ids):
    """`model`'s logits for `input_ids` (a CPU tensor), on the CPU: a trained `result.model`
    stays on the device it trained on, a GPU where there is one."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return model(input_ids=input_ids.to(device)).logits.float().cpu()


def run_or_dump(args: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(args, capture_output=True, text=True, timeout=...)` that prints the
    stacks of a hung process tree (`communicate_or_dump`). A multi-process launch runs on CPU
    (`on_cpu_if_multi_process`)."""
    kwargs["env"] = on_cpu_if_multi_process(args, kwargs.get("env"))
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)
    return communicate_or_dump(proc, timeout)


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    """The first 20,000 characters of the bundled corpus: real text, small enough to be fast."""
    return CORPUS.read_text(encoding="utf-8")[:20_000]


@pytest.fixture
def corpus_file(tmp_path: Path, shakespeare_text: str) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(shakespeare_text, encoding="utf-8")
    return path


def tiny_recipe_dict(corpus: Path, output_dir: Path, **sections: dict) -> dict:
    """A recipe that trains a 1-layer GPT-2 for a few steps in about a second."""
    recipe = {
        "run": {"output_dir": str(output_dir), "seed": 0},
        "tokenizer": {"kind": "char"},
        "data": {"train_files": [str(corpus)], "val_fraction": 0.1, "block_size": 16,
                 "shuffle_tokens": 1024},
        "model": {"arch": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32},
        "train": {"batch_size": 8, "max_steps": 30, "lr": 3e-3, "warmup_steps": 5,
                  "min_lr": 3e-4, "log_interval": 5},
        "eval": {"interval": 15, "batch_size": 16},
        "sample": {"prompt": "ROMEO:", "max_new_tokens": 40},
    }
    for name, values in sections.items():
        recipe[name].update(values)
    return recipe


def blocks_of(batch: dict) -> list[list[int]]:
    """The (block_size + 1)-token blocks of a batch of text: inputs plus the last target."""
    return [[*ids, labels[-1]] for ids, labels in zip(batch["input_ids"].tolist(),
                                                      batch["labels"].tolist(), strict=True)]


def unpack(blocks: list[list[int]]) -> list[int]:
    """Consecutive blocks share one token: the first block whole, then each next minus its head."""
    stream = list(blocks[0])
    for block in blocks[1:]:
        assert block[0] == stream[-1], "consecutive blocks must share one token"
        stream.extend(block[1:])
    return stream


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run the hftrain CLI in-process: exit code, stdout, stderr."""
    from hftrain.cli import main

    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_packed_examples_apart(model, batch: dict) -> None:
    """Each fine-tuning example packed in `batch`'s first row gets the logits it gets alone
    (its position ids restart at 0, without a cache as in training), and without the position
    ids the examples would mix: the check has teeth."""
    import torch

    positions = batch["position_ids"][0]
    starts = [0, *(i for i in range(1, len(positions)) if positions[i] == 0)]
    assert len(starts) >= 3, "the block should hold several examples"
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits
        for begin, end in zip(starts, [*starts[1:], len(positions)], strict=True):
            alone = model(input_ids=batch["input_ids"][:, begin:end]).logits
            torch.testing.assert_close(packed[:, begin:end], alone, rtol=1e-5, atol=1e-5)
        crossed = model(input_ids=batch["input_ids"]).logits
    assert not torch.allclose(crossed[:, starts[1]:], packed[:, starts[1]:], atol=1e-3)
