"""Every optimizer (issue 13): adamw, adam, sgd, rmsprop, adafactor and muon train a tiny GPT-2,
resume exactly after kill -9, never let a NaN step update the model; muon groups exactly the
2-D hidden matrices, each part on its own learning rate under one schedule; bad settings are
one line."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import REPO, tiny_recipe_dict
from safetensors.torch import load_file

from hftrain.errors import RecipeError
from hftrain.models import MODELS, GPT2Fields, build_gpt2, build_recurrent
from hftrain.models.rnn import RecurrentFields
from hftrain.optim import (
    Muon,
    MuonWithAdamW,
    build_optimizer,
    build_scheduler,
    muon_split,
    newton_schulz,
)
from hftrain.recipe import Recipe, TokenizerConfig, TrainConfig, recipe_from_dict
from hftrain.tokenizer import build_tokenizer
from hftrain.tracking import read_metrics
from hftrain.train import train
from hftrain.train_state import Run
from hftrain.train_step import TrainStep

FAULTS = REPO / "tests" / "fault_injection.py"
OPTIMIZERS = ["adamw", "adam", "sgd", "rmsprop", "adafactor", "muon"]
SETTINGS = {  # each optimizer at a learning rate that trains the tiny model in 20 steps
    "adamw": {},
    "adam": {"weight_decay": 0.0},
    "sgd": {"lr": 0.5, "min_lr": 0.05, "momentum": 0.9, "nesterov": True},
    "rmsprop": {"lr": 2e-3, "min_lr": 2e-4, "momentum": 0.5},
    "adafactor": {"lr": 0.1, "min_lr": 0.01},
    "muon": {"muon_lr": 0.02, "muon_momentum": 0.95},
}
KILL_AT, INTERVAL, STEPS = 14, 10, 20


@pytest.fixture(scope="module")
def tok(shakespeare_text):
    return build_tokenizer(TokenizerConfig(kind="char"), [shakespeare_text], 16)


def recipe_dict(corpus: Path, out: Path, optimizer: str) -> dict:
    data = tiny_recipe_dict(corpus, out, train={"optimizer": optimizer, "max_steps": STEPS,
                                                "log_interval": 5, **SETTINGS[optimizer]},
                            eval={"interval": 100, "max_batches": 2},
                            sample={"max_new_tokens": 0})
    data["checkpoint"] = {"interval": INTERVAL, "keep": 2}
    return data


def digest(micro_batches) -> str:  # as tests/fault_injection.py records a step
    h = hashlib.sha1()
    for batch in micro_batches:
        h.update(batch["input_ids"].numpy().tobytes())
    return h.hexdigest()[:16]


def train_recording(recipe: Recipe, record: Path):
    """`train` in this process, appending "step digest" per optimizer step to `record`."""
    original = Run.optimizer_step

    def recording(self, micro_batches):
        with open(record, "a") as f:
            f.write(f"{self.step + 1} {digest(micro_batches)}\n")
        return original(self, micro_batches)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Run, "optimizer_step", recording)
        return train(recipe)


def trained_steps(record: Path) -> dict[int, str]:
    """step -> digest; a later line for a step wins (a resumed run retrains the steps the
    killed run made after its last checkpoint)."""
    return {int(s): d for s, d in (line.split() for line in record.read_text().splitlines())}


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


_WHOLE: dict[str, tuple[Path, dict[int, float], dict[int, str]]] = {}


@pytest.fixture(scope="module")
def whole_corpus(tmp_path_factory, shakespeare_text) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(shakespeare_text)
    return path


def uninterrupted(optimizer: str, corpus: Path, root: Path):
    """The run for `optimizer` without a fault, once per module: (run dir, losses, digests)."""
    if optimizer not in _WHOLE:
        run_dir, record = root / f"whole-{optimizer}", root / f"whole-{optimizer}.txt"
        result = train_recording(recipe_from_dict(recipe_dict(corpus, run_dir, optimizer)),
                                 record)
        assert result.step == STEPS and not result.interrupted
        _WHOLE[optimizer] = (run_dir, losses(run_dir), trained_steps(record))
    return _WHOLE[optimizer]


@pytest.fixture(scope="module")
def whole_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("whole")


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_trains_a_tiny_gpt2(optimizer, whole_corpus, whole_root):
    _, got, _ = uninterrupted(optimizer, whole_corpus, whole_root)
    assert sorted(got) == [5, 10, 15, 20]
    assert all(math.isfinite(v) for v in got.values())
    assert got[20] < got[5] - 0.3, got  # ~4.1 at the start (a 65-character vocabulary)


# AdamW (tests/test_checkpoint.py too), Adafactor's factored state and Muon's two parts by
# default; Adam, SGD and RMSprop keep plain per-parameter buffers: `pytest -m slow`
@pytest.mark.parametrize("optimizer", [pytest.param(name, marks=pytest.mark.slow)
                                       if name in ("adam", "sgd", "rmsprop") else name
                                       for name in OPTIMIZERS])
def test_kill_9_then_resume_reproduces_the_uninterrupted_run(optimizer, whole_corpus,
                                                            whole_root, tmp_path):
    """As tests/test_checkpoint.py does for AdamW: a process killed (SIGKILL) at step 14 and
    resumed from its step-10 checkpoint trains on the same blocks, logs the same losses and
    exports the same weights as the run that was never interrupted: the optimizer's state
    (moments, momentum buffers, Adafactor's factored variances, Muon's and AdamW's parts)
    comes back exactly."""
    recipe = tmp_path / "recipe.yaml"
    data = recipe_dict(whole_corpus, tmp_path / "run", optimizer)
    recipe.write_text(json.dumps(data))
    record = tmp_path / "record.txt"
    killed = subprocess.Popen([sys.executable, str(FAULTS), str(record), str(KILL_AT), "0",
                               "--", "train", str(recipe)], cwd=REPO, text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    whole_dir, whole_losses, whole_steps = uninterrupted(optimizer, whole_corpus, whole_root)
    _, err = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, err
    data["checkpoint"]["resume"] = "auto"
    resumed = train_recording(recipe_from_dict(data, source=str(recipe)), record)
    assert resumed.steps_run == STEPS - INTERVAL
    assert trained_steps(record) == whole_steps  # the same blocks, none twice, none skipped
    got = losses(tmp_path / "run")
    assert got.keys() == whole_losses.keys()
    for step, loss in whole_losses.items():
        assert got[step] == pytest.approx(loss, rel=1e-6), step
    ours = load_file(tmp_path / "run" / "final" / "model.safetensors")
    theirs = load_file(whole_dir / "final" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert torch.equal(ours[name], value), name


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_non_finite_step_never_updates_the_model(optimizer, tok):
    """Fused AdamW and Adam skip the update on the device (`found_inf`); the others (Muon's
    pair included) wait for the host-side check: either way a NaN step changes neither the
    weights nor the optimizer state, and the next finite step trains."""
    torch.manual_seed(0)
    model = build_gpt2(GPT2Fields(n_layer=1, n_head=2, n_embd=16), tok, 16)
    config = TrainConfig(optimizer=optimizer, lr=1e-2, momentum=0.9, warmup_steps=0)
    opt = build_optimizer(model, config)
    step = TrainStep(Accelerator(cpu=True), model, opt, build_scheduler(opt, config), config)
    assert step.skip_on_device == (optimizer in ("adamw", "adam"))
    ids = torch.randint(4, len(tok), (2, 17))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    step([batch])  # a first finite step: the optimizer has state now
    with torch.no_grad():
        model.transformer.wte.weight[5, 0] = float("nan")  # every loss is NaN now
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = copy.deepcopy(opt.state_dict()["state"])
    assert state  # something to compare
    finite = step([batch]).finite
    assert not bool(finite)
    for name, value in model.state_dict().items():
        assert torch.equal(value.nan_to_num(), weights[name].nan_to_num()), name
    after = opt.state_dict()["state"]
    assert after.keys() == state.keys()
    for key, fields in state.items():
        for field, value in fields.items():
            assert torch.equal(torch.as_tensor(after[key][field]), torch.as_tensor(value)), field
    with torch.no_grad():
        model.transformer.wte.weight[5, 0] = 0.0
    finite = step([batch]).finite
    hidden = "transformer.h.0.mlp.c_fc.weight"
    assert bool(finite) and not torch.equal(model.state_dict()[hidden], weights[hidden])


# --- Muon's grouping ------------------------------------------------------------------------


def gpt2_hidden(n_layer: int) -> set[str]:
    return {f"transformer.h.{i}.{m}.weight" for i in range(n_layer)
            for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}


def decoder_hidden(n_layer: int) -> set[str]:
    return {f"model.layers.{i}.{m}.weight" for i in range(n_layer)
            for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                      "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


def lstm_hidden(n_layer: int) -> set[str]:
    return {f"rnn.weight_{kind}_l{i}" for i in range(n_layer) for kind in ("ih", "hh")}


def build(arch: str, tied: bool, tok):
    torch.manual_seed(0)
    if arch == "gpt2":
        return build_gpt2(GPT2Fields(n_layer=2, n_head=2, n_embd=16, tie_embeddings=tied),
                          tok, 16)
    if arch == "lstm":  # tied, with a hidden width other than the embedding's: a projection
        fields = RecurrentFields(arch="lstm", embedding_size=16, hidden_size=24, num_layers=2,
                                 tie_embeddings=tied)
        return build_recurrent(fields, tok, 16)
    spec = MODELS[arch]
    return spec.build(spec.fields(arch=arch, n_layer=2, n_head=2, n_kv_head=1, n_embd=16,
                                  tie_embeddings=tied), tok, 16)


CASES = {
    ("gpt2", True): gpt2_hidden(2),
    ("gpt2", False): gpt2_hidden(2),
    ("lstm", True): lstm_hidden(2) | {"projection.weight"},
    ("lstm", False): lstm_hidden(2),
    ("llama", True): decoder_hidden(2),
    ("qwen3", False): decoder_hidden(2),
}


@pytest.mark.parametrize(("arch", "tied"), list(CASES))
def test_muon_takes_exactly_the_hidden_matrices(arch, tied, tok):
    model = build(arch, tied, tok)
    names = {id(p): n for n, p in model.named_parameters()}
    opt = build_optimizer(model, TrainConfig(optimizer="muon"))
    assert isinstance(opt, MuonWithAdamW)
    in_part = {part: [names[id(p)] for g in opt.param_groups if g["part"] == part
                      for p in g["params"]] for part in ("muon", "adamw")}
    assert set(in_part["muon"]) == CASES[arch, tied]
    everything = in_part["muon"] + in_part["adamw"]
    assert sorted(everything) == sorted(names.values())  # every parameter, each once
    assert {n for n, _, _ in muon_split(model)[0]} == CASES[arch, tied]
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    adamw_ids = {id(p) for g in opt.param_groups if g["part"] == "adamw" for p in g["params"]}
    assert id(head.weight) in adamw_ids and id(embedding.weight) in adamw_ids
    if tied:  # one tensor, one group: the AdamW one
        assert head.weight is embedding.weight
        assert sum(p is head.weight for g in opt.param_groups for p in g["params"]) == 1
    for group in opt.param_groups:  # AdamW: only norms and biases escape weight decay
        if group["part"] == "adamw":
            assert all((p.dim() >= 2) == (group["weight_decay"] > 0) for p in group["params"])


def test_each_part_follows_the_schedule_from_its_own_peak(tok):
    """LambdaLR multiplies every group's initial lr by the same factor: AdamW from `lr`, Muon
    from `muon_lr` (times the Conv1D orientation factor), both down to min_lr / lr of it."""
    model = build("gpt2", True, tok)
    config = TrainConfig(optimizer="muon", lr=2e-3, min_lr=2e-4, muon_lr=0.04, warmup_steps=2,
                         max_steps=10)
    opt = build_optimizer(model, config)
    scheduler = build_scheduler(opt, config)
    names = {id(p): n for n, p in model.named_parameters()}
    peak = {names[id(p)]: g["initial_lr"] for g in opt.param_groups for p in g["params"]}
    assert peak["transformer.wte.weight"] == peak["transformer.ln_f.bias"] == 2e-3
    # Keller Jordan's sqrt(max(1, out / in)) for GPT-2's (in, out) Conv1D weights
    assert peak["transformer.h.0.attn.c_proj.weight"] == pytest.approx(0.04)
    assert peak["transformer.h.0.attn.c_attn.weight"] == pytest.approx(0.04 * math.sqrt(3))
    assert peak["transformer.h.0.mlp.c_fc.weight"] == pytest.approx(0.08)
    assert peak["transformer.h.0.mlp.c_proj.weight"] == pytest.approx(0.02)
    for step in range(config.max_steps):
        factors = {round(g["lr"] / g["initial_lr"], 12) for g in opt.param_groups}
        assert len(factors) == 1, step
        assert scheduler.get_last_lr()[0] == opt.param_groups[0]["lr"]  # the logged lr: AdamW's
        opt.step()
        scheduler.step()
    for group in opt.param_groups:  # the end of the schedule: min_lr / lr of every peak
        assert group["lr"] == pytest.approx(group["initial_lr"] * 0.1)
    assert opt.param_groups[0]["lr"] == pytest.approx(config.min_lr)


def test_the_combined_state_loads_into_a_new_optimizer(tok):
    """The state dict is one optimizer's standard layout; loading it points both parts at the
    loaded groups and state, so the next step equals the original optimizer's."""
    model = build("gpt2", True, tok)
    twin = copy.deepcopy(model)
    config = TrainConfig(optimizer="muon", warmup_steps=0)
    opt = build_optimizer(model, config)
    ids = torch.randint(4, len(tok), (2, 17))

    def step(m, o):
        m(input_ids=ids[:, :-1], labels=ids[:, 1:]).loss.backward()
        o.step()
        o.zero_grad()

    step(model, opt)
    twin.load_state_dict(model.state_dict())
    other = build_optimizer(twin, config)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert all(p.state is other.state for p in other.parts.values())
    step(model, opt)
    step(twin, other)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), name


# --- recipe checks -------------------------------------------------------------------------


@pytest.mark.parametrize(("train", "key"), [
    ({"optimizer": "lion"}, "train.optimizer"),
    ({"optimizer": "muon", "muon_lr": -0.02}, "train.muon_lr"),
    ({"muon_momentum": 1.0}, "train.muon_momentum"),
    ({"muon_weight_decay": -1}, "train.muon_weight_decay"),
    ({"optimizer": "sgd", "nesterov": True}, "train.nesterov"),
    ({"nesterov": "yes please"}, "train.nesterov"),
])
def test_a_bad_optimizer_setting_is_one_line_naming_the_key(train, key, tmp_path, corpus_file):
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(tiny_recipe_dict(corpus_file, tmp_path / "run", train=train),
                         source="r.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"r.yaml: {key}"), message


def test_muon_without_hidden_matrices_says_so():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4))
    with pytest.raises(Exception, match="no 2-D hidden weight matrices"):
        build_optimizer(model, TrainConfig(optimizer="muon"))


def _muon_twins(dtype: torch.dtype) -> tuple[list[torch.Tensor], Muon, list[torch.Tensor],
                                             torch.optim.Muon]:
    """Two copies of the same matrices (two wide ones, iterated as a batch by hftrain's Muon,
    and a tall one), one under hftrain's Muon orthogonalising in `dtype`, one under torch's."""
    torch.manual_seed(0)
    shapes = [(32, 96), (32, 96), (96, 32)]
    ours = [torch.randn(s, requires_grad=True) for s in shapes]
    theirs = [p.detach().clone().requires_grad_(True) for p in ours]
    settings = {"lr": 0.02, "momentum": 0.95, "nesterov": True, "weight_decay": 0.1}
    return ours, Muon(ours, orthogonalise_in=dtype, **settings), theirs, \
        torch.optim.Muon(theirs, **settings)


def _step_both(ours, our_opt, theirs, their_opt) -> None:
    for step in range(3):
        torch.manual_seed(100 + step)
        for mine, other in zip(ours, theirs, strict=True):
            mine.grad = torch.randn_like(mine)
            other.grad = mine.grad.clone()
        our_opt.step()
        their_opt.step()


def test_hftrains_muon_is_torchs_update_and_in_fp32_only_the_rounding_differs():
    """In bf16 hftrain's update is torch's step: the same momentum, Nesterov, weight decay,
    learning-rate adjustment and iteration, equal bit for bit whether a matrix is iterated
    alone or in a batch of its shape. In fp32 it differs from torch's bf16 only by bf16's
    rounding, and is closer to the same iteration in float64."""
    ours, our_opt, theirs, their_opt = _muon_twins(torch.bfloat16)
    _step_both(ours, our_opt, theirs, their_opt)
    for mine, other in zip(ours, theirs, strict=True):
        assert torch.equal(mine, other)
        assert torch.equal(our_opt.state[mine]["momentum_buffer"],
                           their_opt.state[other]["momentum_buffer"])

    ours, our_opt, theirs, their_opt = _muon_twins(torch.float32)
    _step_both(ours, our_opt, theirs, their_opt)
    for mine, other in zip(ours, theirs, strict=True):
        assert not torch.equal(mine, other)
        assert torch.allclose(mine, other, atol=2e-3)  # lr 0.02 x bf16's ~1% rounding

    matrix = torch.randn(48, 160)
    exact = newton_schulz(matrix.double(), (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float64)
    error = {dtype: (newton_schulz(matrix, (3.4445, -4.7750, 2.0315), 5, 1e-7, dtype).double()
                     - exact).abs().max().item() for dtype in (torch.float32, torch.bfloat16)}
    assert error[torch.float32] < error[torch.bfloat16] / 100, error


def test_muon_orthogonalises_in_fp32_where_bf16_is_emulated(tmp_path):
    """oneDNN capped to AVX2 (`ONEDNN_MAX_CPU_ISA`), as on a CPU without avx512_bf16 or AMX:
    bf16 is not native, the start-up line's note says so and Muon's part takes fp32."""
    probe = ("from hftrain.launch import bf16_is_native, describe_bf16\n"
             "from hftrain.optim import build_optimizer\n"
             "from hftrain.recipe import TrainConfig\n"
             "from transformers import GPT2Config, GPT2LMHeadModel\n"
             "model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=40))\n"
             "opt = build_optimizer(model, TrainConfig(optimizer='muon'))\n"
             "print(bf16_is_native('cpu'), opt.parts['muon'].orthogonalise_in)\n"
             "print(describe_bf16('cpu'))\n")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        "False torch.float32",
        ", bf16 emulated (no avx512_bf16/AMX): Muon orthogonalises in fp32"]
