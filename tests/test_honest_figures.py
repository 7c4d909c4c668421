"""Figures that mean what they say, and launches that do what they ask (issue 12, items 5
and 6): a window of skipped steps logs no loss, the learning rate follows the step counter,
a resumed run says which steps it trained, the model card's global batch counts the
processes; hftrain says what Accelerate set up, refuses sharding that will not happen, and
warns about mixed precision that costs (or does nothing) on this CPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import matplotlib.axes
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from conftest import REPO, cli, tiny_recipe_dict

import hftrain.launch
import hftrain.tracking
import hftrain.train_step
from hftrain.errors import HftrainError
from hftrain.hub import model_card
from hftrain.launch import check_sharding_set_up, describe_bf16
from hftrain.models import GPT2Fields, build_gpt2
from hftrain.optim import build_optimizer, build_scheduler
from hftrain.recipe import TokenizerConfig, TrainConfig
from hftrain.tokenizer import build_tokenizer
from hftrain.tracking import read_metrics
from hftrain.train_step import TrainStep

SKIPPED = range(6, 11)
"""Steps whose loss is made NaN: the whole second log window (log_interval 5)."""


def recipe_file(tmp_path: Path, corpus: Path, **train) -> Path:
    data = tiny_recipe_dict(corpus, tmp_path / "run", eval={"interval": 1000})
    data["train"].update({"max_steps": 20, "log_interval": 5, **train})
    data["checkpoint"] = {"interval": 10}
    data["sample"]["max_new_tokens"] = 0
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(data))
    return path


def nan_on_steps(monkeypatch, steps: range) -> None:
    """The training loss of `steps` is NaN (one micro-batch per step)."""
    real_nll = hftrain.train_step.token_nll
    calls = {"n": 0}

    def nll(logits, labels):
        calls["n"] += 1
        return real_nll(logits, labels) * (float("nan") if calls["n"] in steps else 1.0)

    monkeypatch.setattr(hftrain.train_step, "token_nll", nll)


def logged_steps(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


@pytest.fixture
def skipped_window_run(tmp_path, corpus_file, monkeypatch, capsys):
    """A 20-step run with `on_nan: skip` whose steps 6-10 are all NaN, with what the plot
    drew and what the console said."""
    nan_on_steps(monkeypatch, SKIPPED)
    drawn: list[tuple[list, list]] = []
    real_plot = matplotlib.axes.Axes.plot

    def recording_plot(self, *args, **kwargs):
        drawn.append((list(args[0]), list(args[1])))
        return real_plot(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording_plot)
    code, out, err = cli(["train", str(recipe_file(tmp_path, corpus_file)),
                          "train.on_nan=skip"], capsys)
    assert code == 0, err
    return tmp_path / "run", drawn, out


def test_a_window_of_skipped_steps_logs_no_loss(skipped_window_run):
    run_dir, _, out = skipped_window_run
    records = logged_steps(run_dir)
    assert records[10]["loss"] is None and records[10]["skipped_steps"] == 5
    assert '"loss": null' in (run_dir / "metrics.jsonl").read_text()
    assert all(records[s]["loss"] > 1.0 for s in (5, 15, 20))  # finite windows: real losses
    said = [line for line in out.splitlines() if line.startswith("step 10:")]
    assert len(said) == 1 and "every step since the last log line was skipped" in said[0]
    assert "loss 0" not in out and "loss=0.0" not in out


def test_loss_png_leaves_out_a_window_without_a_loss(skipped_window_run):
    run_dir, drawn, _ = skipped_window_run
    assert (run_dir / "loss.png").is_file()
    (steps, losses), = [line for line in drawn if 10 in line[0]]  # the training curve
    point = dict(zip(steps, losses, strict=True))
    assert math.isnan(point[10])  # not drawn: a gap, not a dive to 0
    assert all(loss > 1.0 for step, loss in point.items() if step != 10)


def test_the_learning_rate_follows_the_step_counter_through_skipped_steps(
        tmp_path, corpus_file, monkeypatch, capsys):
    """Step N runs (and logs) the schedule's learning rate for step N, whether or not steps
    before it were skipped: the schedule is not held back by the five skipped steps."""
    nan_on_steps(monkeypatch, SKIPPED)
    code, _, err = cli(["train", str(recipe_file(tmp_path, corpus_file)),
                        "train.on_nan=skip"], capsys)
    assert code == 0, err
    config = TrainConfig(max_steps=20, lr=3e-3, warmup_steps=5, min_lr=3e-4)
    schedule = build_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)],
                                               lr=config.lr), config)
    rate = schedule.lr_lambdas[0]  # step N runs at the rate after N - 1 schedule steps
    records = logged_steps(tmp_path / "run")
    assert sorted(records) == [5, 10, 15, 20]
    for step, record in records.items():
        assert record["lr"] == pytest.approx(config.lr * rate(step - 1), abs=1e-6), step


def test_a_step_the_optimizer_skipped_still_advances_the_schedule(shakespeare_text,
                                                                  monkeypatch):
    """fp16's GradScaler skips an update on overflow (`optimizer_step_was_skipped`): the
    step is counted, so the schedule must move on with it."""
    tok = build_tokenizer(TokenizerConfig(kind="char"), [shakespeare_text], 16)
    torch.manual_seed(0)
    model = build_gpt2(GPT2Fields(n_layer=1, n_head=2, n_embd=16), tok, 16)
    config = TrainConfig(lr=1e-2, warmup_steps=10, max_steps=20)
    accelerator = Accelerator(cpu=True)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    step = TrainStep(accelerator, model, optimizer, scheduler, config)
    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(lambda _: True))
    ids = torch.randint(4, len(tok), (2, 17))
    for _ in range(3):
        step([{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}])
    assert scheduler.last_epoch == 3
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-2 * 3 / 10)


def test_a_resumed_run_says_which_steps_it_trained(tmp_path, corpus_file, capsys):
    recipe = recipe_file(tmp_path, corpus_file, max_steps=10)
    code, out, err = cli(["train", str(recipe)], capsys)
    assert code == 0, err
    assert "trained 10 steps in" in out
    code, out, err = cli(["train", str(recipe), "--resume", "train.max_steps=25"], capsys)
    assert code == 0, err
    assert "trained steps 11-25 (15 steps this run, resumed at step 10) in" in out
    assert "trained 25 steps" not in out


def test_the_model_card_counts_every_process_in_the_global_batch(tmp_path, corpus_file,
                                                                 capsys):
    recipe = recipe_file(tmp_path, corpus_file, max_steps=4, grad_accum_steps=2)
    code, _, err = cli(["train", str(recipe)], capsys)
    assert code == 0, err
    export = tmp_path / "run" / "final"
    record = json.loads((export / "hftrain_run.json").read_text())
    assert record["processes"] == 1 and record["global_batch_blocks"] == 16
    card = str(model_card(export, "me/tiny", None))
    assert "16 blocks of 16 tokens (batch_size 8 x grad_accum_steps 2 x 1 process)" in card
    # the same recipe trained by 4 processes (torchrun): 4 times the blocks per step
    (export / "hftrain_run.json").write_text(json.dumps({**record, "processes": 4}))
    card = str(model_card(export, "me/tiny", None))
    assert "64 blocks of 16 tokens (batch_size 8 x grad_accum_steps 2 x 4 processes)" in card
    # an export written before the processes were recorded does not pass a guess off
    (export / "hftrain_run.json").unlink()
    card = str(model_card(export, "me/tiny", None))
    assert "16 blocks of 16 tokens per process" in card and "not recorded" in card


def test_training_starts_by_saying_what_accelerate_set_up(tmp_path, corpus_file, capsys):
    code, out, err = cli(["train", str(recipe_file(tmp_path, corpus_file, max_steps=2))],
                         capsys)
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("accelerate:")]
    bf16 = describe_bf16("cpu")  # this CPU's: native, or emulated and what changes
    assert bf16 in (", bf16 native",
                    ", bf16 emulated (no avx512_bf16/AMX): Muon orthogonalises in fp32")
    assert lines == ["accelerate: 1 process on cpu, NO (not distributed), mixed precision "
                     f"no{bf16}"]


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_sharding_asked_for_on_cpu_is_refused_before_anything_is_written(
        variable, tmp_path, corpus_file, monkeypatch, capsys):
    """FSDP or DeepSpeed in one CPU process would train unsharded (over several CPU
    processes they run: tests/test_sharded.py)."""
    monkeypatch.setenv(variable, "true")
    code, out, err = cli(["train", str(recipe_file(tmp_path, corpus_file))], capsys)
    errors = [line for line in err.splitlines() if line.startswith("hftrain: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    name = "FSDP" if variable.endswith("FSDP") else "DeepSpeed"
    assert f"asks for {name} ({variable}=true)" in errors[0]
    assert f"on CPU with 1 process, where {name} needs several processes" in errors[0]
    assert "torchrun --nproc_per_node N" in errors[0]
    assert not (tmp_path / "run").exists() and "accelerate:" not in out


def test_accelerate_launch_with_the_fsdp_config_on_cpu_is_refused(tmp_path, corpus_file):
    """The user's command itself: `accelerate launch --config_file accelerate_configs/
    fsdp.yaml` on a machine without a GPU (Accelerate would run plain processes)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: FSDP shards here")
    recipe = recipe_file(tmp_path, corpus_file)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(REPO / "accelerate_configs" / "fsdp.yaml"), "--num_processes", "1",
         "-m", "hftrain", "train", str(recipe)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert launched.returncode != 0
    errors = [line for line in launched.stderr.splitlines() if line.startswith("hftrain:")]
    assert len(errors) == 1 and "asks for FSDP (ACCELERATE_USE_FSDP=true)" in errors[0]
    assert not (tmp_path / "run").exists()


def test_sharding_asked_for_but_not_set_up_is_refused():
    """Also where a device is present: `ACCELERATE_USE_FSDP=1` (Accelerate acts only on
    'true'), or one process started without `accelerate launch`, gives a plain run."""
    plain = SimpleNamespace(distributed_type=DistributedType.NO, device=torch.device("cuda"),
                            num_processes=1, is_main_process=True)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ACCELERATE_USE_FSDP", "1")
        with pytest.raises(HftrainError, match=r"asks for FSDP \(ACCELERATE_USE_FSDP=1\) but "
                                               r"Accelerate set up NO on cuda with 1 process"):
            check_sharding_set_up(plain)
        check_sharding_set_up(SimpleNamespace(**{**vars(plain),
                                                 "distributed_type": DistributedType.FSDP}))


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one precision per process: start this test's Accelerator afresh and
    leave none behind for the next test (which would otherwise inherit bf16)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_bf16_instructions_warns_of_the_cost(
        native, tmp_path, corpus_file, monkeypatch, capsys, fresh_accelerate_state):
    monkeypatch.setattr(hftrain.launch, "cpu_has_native_bf16", lambda *_: native)
    monkeypatch.setattr(hftrain.launch, "bf16_is_native", lambda *_: native)
    code, out, err = cli(["train", str(recipe_file(tmp_path, corpus_file, max_steps=2)),
                          "train.mixed_precision=bf16"], capsys)
    assert code == 0, err
    assert "accelerate: 1 process on cpu, NO (not distributed), mixed precision bf16" in out
    warnings = [line for line in err.splitlines() if line.startswith("hftrain: warning:")]
    if native:
        assert warnings == []
    else:
        assert len(warnings) == 1 and "without bf16 instructions" in warnings[0]
        assert "about 10x slower than fp32" in warnings[0]


def test_fp16_on_cpu_says_it_trains_in_fp32(tmp_path, corpus_file, capsys,
                                            fresh_accelerate_state):
    code, out, err = cli(["train", str(recipe_file(tmp_path, corpus_file, max_steps=2)),
                          "train.mixed_precision=fp16"], capsys)
    assert code == 0, err
    assert "mixed precision fp16 asked, not applied on cpu: fp32" in out
    warnings = [line for line in err.splitlines() if line.startswith("hftrain: warning:")]
    assert len(warnings) == 1 and "this run trains in fp32" in warnings[0]
    record = json.loads((tmp_path / "run" / "final" / "hftrain_run.json").read_text())
    assert record["mixed_precision"] == "no"  # the export records what ran


def test_cpu_flags_tell_native_bf16(tmp_path):
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    zen4 = tmp_path / "zen4"
    zen4.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    graviton3 = tmp_path / "graviton3"
    graviton3.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")
    assert hftrain.launch.cpu_has_native_bf16(avx2) is False
    assert hftrain.launch.cpu_has_native_bf16(zen4) is True
    assert hftrain.launch.cpu_has_native_bf16(graviton3) is True
    assert hftrain.launch.cpu_has_native_bf16(tmp_path / "missing") is None


def test_the_start_up_line_names_the_sharding_in_use():
    """What a GPU launch with accelerate_configs/fsdp.yaml would print (no GPU here: the
    Accelerator is a stand-in with Accelerate's own plugin)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True)
    fsdp = SimpleNamespace(
        distributed_type=DistributedType.FSDP, device=torch.device("cuda", 0),
        num_processes=8, is_main_process=True, mixed_precision="bf16", native_amp=True,
        state=SimpleNamespace(backend="nccl", fsdp_plugin=plugin))
    assert hftrain.launch.describe_setup(fsdp) == (
        "accelerate: 8 processes on cuda, FSDP (nccl), mixed precision bf16, FSDP2 (full shard)")


def test_a_resume_under_another_launch_precision_is_refused_in_one_line(
        tmp_path, corpus_file, capsys, monkeypatch, fresh_accelerate_state):
    """The precision chosen by the launch (ACCELERATE_MIXED_PRECISION, an Accelerate config),
    not the recipe, is part of the run: a bf16 run resumed in fp32 (or the reverse) would
    silently change it and the export would record one precision for both."""
    recipe = recipe_file(tmp_path, corpus_file, max_steps=10)
    code, _, err = cli(["train", str(recipe)], capsys)
    assert code == 0, err
    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    code, out, err = cli(["train", str(recipe), "train.max_steps=20", "--resume"], capsys)
    errors = [line for line in err.splitlines() if line.startswith("hftrain: error:")]
    assert code == 2 and len(errors) == 1, err
    assert "launch.mixed_precision ('no' -> 'bf16')" in errors[0]
    assert "different recipe or launch" in errors[0]
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert max(steps) == 10  # nothing trained


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L4", 121.0),
    ("NVIDIA L40", 181.0), ("NVIDIA L40S", 362.0), ("NVIDIA A10", 125.0),
    ("NVIDIA A10G", None), ("NVIDIA GeForce RTX 4090", 165.0)])
def test_mfu_takes_each_gpu_variants_own_peak(name, tflops):
    """The PCIe and NVL H100s are not the SXM's 989 TFLOP/s, an L4 is not an L40, an A10G is
    not an A10 (its peak is not published: no MFU rather than a wrong one)."""
    assert hftrain.tracking.peak_tflops(None, name) == tflops
