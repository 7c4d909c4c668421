"""Sharded training (issue 19) on CPU, through the code GPUs run: torch's FSDP2 over gloo,
started as `accelerate launch --config_file accelerate_configs/fsdp.yaml` starts it (its
launch variables) under torchrun. Each run is a subprocess with a time limit, so a deadlock
(a forward one rank takes alone) fails the test instead of hanging it."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO,
    communicate_or_dump,
    on_cpu_if_multi_process,
    run_or_dump,
    tiny_recipe_dict,
)
from safetensors.torch import load_file

from hftrain.checkpoint import (
    STATE_FILE,
    complete_checkpoints,
    damage,
    manifest_names,
    newest_intact_checkpoint,
    state_digest,
)
from hftrain.tracking import read_metrics

FAULTS = REPO / "tests" / "fault_injection.py"
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def launch_variables(config: str) -> dict[str, str]:
    """What `accelerate launch --config_file accelerate_configs/CONFIG.yaml` sets for its
    processes, from Accelerate's own launcher code (2 processes, fp32 on CPU)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(REPO / "accelerate_configs" / f"{config}.yaml"),
         "--num_processes", "2", "--mixed_precision", "no", "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:  # as `launch_command` does before its DeepSpeed launcher
        fields = [*defaults.deepspeed_config, "mixed_precision"]
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        env = prepare_deepspeed_cmd_env(args)[1]
    else:
        env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def fsdp_launch_variables() -> dict[str, str]:
    return launch_variables("fsdp")


TIME_LIMIT = 240

LLAMA_LORA = {"arch": "llama", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_kv_head": 2,
              "intermediate_size": 64, "tie_embeddings": False, "lora_r": 4}


def launch(tmp_path: Path, name: str, data: dict, fsdp: bool | str, *args: str,
           kill_at_step: int = 0) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2` of `hftrain train` (through the fault injector, which
    records what each step trained on) into tmp_path/name: plain DDP, FSDP2 (`fsdp` True)
    or as the named Accelerate config launches it ("deepspeed_zero2")."""
    data = json.loads(json.dumps(data))
    data["run"]["output_dir"] = str(tmp_path / name)
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(json.dumps(data))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    config = "fsdp" if fsdp is True else fsdp  # or a DeepSpeed config's name
    env.update(launch_variables(config) if config else {}, OMP_NUM_THREADS="1")
    return run_or_dump(
        [TORCHRUN, "--nproc_per_node", "2", str(FAULTS), str(tmp_path / f"{name}.record"),
         str(kill_at_step), "0", "--", "train", str(recipe), *args],
        TIME_LIMIT, cwd=REPO, env=env)


def recipe_data(tmp_path: Path, corpus: Path, model: dict | None = None) -> dict:
    """A tiny run whose validation file is one piece: one rank holds all of it, the other
    none, so the ranks hold unequal numbers of validation batches."""
    val = tmp_path / "val.txt"
    val.write_text(corpus.read_text(encoding="utf-8")[:1500], encoding="utf-8")
    data = tiny_recipe_dict(corpus, tmp_path / "unused", train={"batch_size": 4},
                            eval={"interval": 15, "batch_size": 8})
    data["data"].update(val_files=[str(val)], val_fraction=0.0)
    data["checkpoint"] = {"interval": 10, "keep": 3}
    if model:
        data["model"] = model
    return data


def metrics(run: Path) -> list[dict]:
    return read_metrics(run / "metrics.jsonl")


def sample_of(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout.split("sample:\n", 1)[1]


@pytest.fixture(scope="module")
def fsdp_gpt2(tmp_path_factory, shakespeare_text):
    """One uninterrupted FSDP2 run of the tiny GPT-2, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("fsdp")
    corpus = tmp / "corpus.txt"
    corpus.write_text(shakespeare_text, encoding="utf-8")
    data = recipe_data(tmp, corpus)
    proc = launch(tmp, "whole", data, fsdp=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, data, proc


def assert_same_run(a: Path, b: Path, tolerance: float = 1e-4) -> None:
    """Equal training and validation losses at every logged step, and equal exports."""
    ma, mb = metrics(a), metrics(b)
    assert [sorted(r) for r in ma] == [sorted(r) for r in mb]
    for x, y in zip(ma, mb, strict=True):
        for key in ("loss", "val_loss"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=tolerance), (x["step"], key)
        assert x.get("val_tokens") == y.get("val_tokens")
    wa, wb = (load_file(run / "final" / "model.safetensors") for run in (a, b))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=tolerance, rtol=tolerance)


# GPT-2 under FSDP2 is also the kill -9 test's model: its variant here runs with -m slow
@pytest.mark.parametrize("model", [pytest.param("gpt2", marks=pytest.mark.slow), "llama_lora"])
def test_fsdp2_equals_ddp_with_uneven_validation_sample_and_export(
        model, fsdp_gpt2, tmp_path, corpus_file):
    if model == "gpt2":
        tmp, data, fsdp = fsdp_gpt2
        fsdp_run = tmp / "whole"
    else:  # and with activation checkpointing on the FSDP side only (issue 23): same run
        tmp, data = tmp_path, recipe_data(tmp_path, corpus_file, LLAMA_LORA)
        checkpointed = json.loads(json.dumps(data))
        checkpointed["train"]["gradient_checkpointing"] = True
        fsdp = launch(tmp, "fsdp", checkpointed, fsdp=True)
        assert fsdp.returncode == 0, fsdp.stderr[-3000:]
        fsdp_run = tmp / "fsdp"
    ddp = launch(tmp, f"ddp_{model}", data, fsdp=False)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "FSDP (gloo), mixed precision no, FSDP2 (full shard)" in fsdp.stdout
    assert "MULTI_CPU (gloo)" in ddp.stdout
    assert_same_run(tmp / f"ddp_{model}", fsdp_run)
    # the one-piece validation file was scored whole, and the evaluation did not deadlock
    assert metrics(fsdp_run)[-1]["val_tokens"] == 1500
    assert sample_of(fsdp) == sample_of(ddp) and len(sample_of(fsdp)) > len("ROMEO:")
    record = json.loads((fsdp_run / "final" / "hftrain_run.json").read_text())
    assert record["distributed_type"] == "FSDP" and record["processes"] == 2
    if model == "llama_lora":  # merged: a plain model, no adapter weights
        assert not any("lora" in key for key in load_file(fsdp_run / "final" /
                                                          "model.safetensors"))


def test_fsdp2_kill_9_then_resume_equals_the_uninterrupted_run_past_a_damaged_shard(
        fsdp_gpt2):
    tmp, data, _ = fsdp_gpt2
    killed = launch(tmp, "killed", data, fsdp=True, kill_at_step=25)
    assert killed.returncode != 0
    newest = complete_checkpoints(tmp / "killed")[-1]
    assert newest.name == "step-00000020"
    shard = newest / "pytorch_model_fsdp_0" / "__1_0.distcp"  # rank 1's weights
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # the same size, one byte changed
    shard.write_bytes(bytes(raw))
    assert "pytorch_model_fsdp_0/__1_0.distcp was altered" in damage(newest)
    resumed = launch(tmp, "killed", data, True, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping damaged checkpoint" in resumed.stderr
    assert "resumed from" in resumed.stdout and "step-00000010 at step 10" in resumed.stdout
    assert_same_run(tmp / "whole", tmp / "killed", tolerance=1e-5)
    for rank in range(2):  # every step trained on the blocks of the uninterrupted run
        whole = (tmp / f"whole.record.rank{rank}").read_text().splitlines()
        got = dict(line.split() for line in
                   (tmp / f"killed.record.rank{rank}").read_text().splitlines())
        assert got == dict(line.split() for line in whole)


class Planted:
    """A pickle that, when loaded, creates a file: proof that it ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def reseal(checkpoint: Path) -> None:
    """Rewrite the manifest as an attacker with write access would: every digest matches."""
    import hashlib

    state = json.loads((checkpoint / STATE_FILE).read_text())
    state["files"] = {name: {"size": (checkpoint / name).stat().st_size,
                             "sha256": hashlib.sha256((checkpoint / name).read_bytes())
                             .hexdigest()} for name in manifest_names(checkpoint)
                      if name != STATE_FILE}
    state["state_sha256"] = state_digest(state)
    (checkpoint / STATE_FILE).write_text(json.dumps(state))


def byte_item_regions(folder: Path) -> list[tuple[Path, int, int]]:
    """(file, offset, length) of every non-tensor value DCP stored in `folder`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = FileSystemReader(str(folder)).read_metadata()  # hftrain's own, unaltered file
    byte_fqns = {k for k, v in metadata.state_dict_metadata.items()
                 if isinstance(v, BytesStorageMetadata)}
    return [(folder / info.relative_path, info.offset, info.length)
            for index, info in metadata.storage_data.items() if index.fqn in byte_fqns]


def test_a_planted_pickle_in_a_sharded_checkpoint_never_runs(fsdp_gpt2, tmp_path):
    tmp, _, _ = fsdp_gpt2
    source = complete_checkpoints(tmp / "whole")[-1]
    assert damage(source) is None
    names = [n for n in manifest_names(source) if "/" in n]  # the DCP folders' files
    assert {"pytorch_model_fsdp_0/.metadata", "optimizer_0/.metadata"} <= set(names)
    marker = tmp_path / "pickle-ran"
    payload = pickle.dumps(Planted(marker))
    regions = byte_item_regions(source / "optimizer_0")
    assert regions, "the optimizer's DCP folder holds non-tensor values"
    for name in names:
        planted = tmp_path / "run" / "checkpoints" / source.name
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
        shutil.copytree(source, planted)
        if name.endswith(".metadata"):
            (planted / name).write_bytes(payload)
        else:  # a shard: the planted pickle where DCP unpickles a non-tensor value
            regions = [r for r in byte_item_regions(planted / Path(name).parent)
                       if r[0].name == Path(name).name]
            if not regions:
                continue
            file, offset, length = regions[0]
            raw = bytearray(file.read_bytes())
            raw[offset:offset + length] = payload.ljust(length, b".")[:length]
            assert len(payload) <= length
            file.write_bytes(bytes(raw))
        reseal(planted)
        problem = damage(planted)
        assert problem is not None and "can read safely" in problem, (name, problem)
        assert newest_intact_checkpoint(tmp_path / "run") is None
        assert not marker.exists(), f"the pickle planted in {name} ran"


@pytest.mark.parametrize("arch, unit", [("gpt2", "GPT2Block"), ("llama", "LlamaDecoderLayer"),
                                        ("qwen3", "Qwen3DecoderLayer"), ("lstm", "LSTM"),
                                        ("gru", "GRU"), ("rnn_tanh", "RNN")])
def test_fsdp_wraps_each_layer_of_the_models_own_class(arch, unit, shakespeare_text,
                                                       monkeypatch):
    """With the shipped config (which names no class) or a bare `ACCELERATE_USE_FSDP=true`,
    Accelerate's plugin takes the layer class from the model (`_no_split_modules`)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    from hftrain.models import MODELS, build_model
    from hftrain.recipe import TokenizerConfig
    from hftrain.sharding import wrap_each_layer_by_default
    from hftrain.tokenizer import build_tokenizer

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.delenv("FSDP_AUTO_WRAP_POLICY", raising=False)
    monkeypatch.delenv("FSDP_TRANSFORMER_CLS_TO_WRAP", raising=False)
    wrap_each_layer_by_default()
    tok = build_tokenizer(TokenizerConfig(kind="char"), [shakespeare_text[:2000]], 16)
    small = ({"n_layer": 2, "n_head": 2, "n_embd": 16} if arch in ("gpt2", "llama", "qwen3")
             else {"embedding_size": 16, "hidden_size": 16, "num_layers": 2})
    model = build_model(MODELS[arch].fields(arch=arch, **small), tok, 16)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    plugin.set_auto_wrap_policy(model)
    assert plugin.transformer_cls_names_to_wrap == [unit]
    wrapped = [name for name, module in model.named_modules()
               if plugin.auto_wrap_policy(module, recurse=False, nonwrapped_numel=0)]
    assert len(wrapped) == (2 if arch in ("gpt2", "llama", "qwen3") else 1), wrapped


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RENDEZVOUS_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
"""torch 2.13's torchrun: without it, restarts under c10d fail in gloo's connectFullMesh."""


def agents(tmp_path: Path, name: str, data: dict, nodes: list[Path], *args: str,
           restarts: int = 0, kill_at_step: int = 0,
           node_args: list[list[str]] | None = None) -> list[subprocess.CompletedProcess]:
    """One torchrun agent per "node" (each started in its own folder, with the c10d
    rendezvous on 127.0.0.1), FSDP2 as the shipped config sets it up; each node runs
    `len(nodes) == 1 ? 2 : 1` processes."""
    data = json.loads(json.dumps(data))
    data["run"]["output_dir"] = data["run"].get("relative_output_dir") or str(tmp_path / name)
    data["run"].pop("relative_output_dir", None)
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(json.dumps(data))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update({**fsdp_launch_variables(), **RENDEZVOUS_ENV}, OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO), KILL_ONCE=str(tmp_path / f"{name}.killed-once"))
    port, per_node = free_port(), 2 if len(nodes) == 1 else 1
    env = on_cpu_if_multi_process(["--nnodes"], env)
    started = [subprocess.Popen(
        [TORCHRUN, "--nnodes", str(len(nodes)), "--nproc_per_node", str(per_node),
         "--node-rank", str(rank), "--max-restarts", str(restarts), "--rdzv-backend", "c10d",
         "--rdzv-endpoint", f"127.0.0.1:{port}", str(FAULTS), str(tmp_path / f"{name}.record"),
         str(kill_at_step), "0", "--", "train", str(recipe), *args,
         *(node_args[rank] if node_args else [])],
        cwd=node, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank, node in enumerate(nodes)]
    return [communicate_or_dump(proc, TIME_LIMIT) for proc in started]


def test_a_worker_killed_under_torchrun_max_restarts_resumes_and_equals_the_whole_run(
        fsdp_gpt2):
    """`torchrun --max-restarts 1 ... train RECIPE --resume`: the first start begins the
    run, the restart after a worker's kill -9 resumes it from the newest checkpoint."""
    tmp, data, _ = fsdp_gpt2
    [agent] = agents(tmp, "elastic", data, [tmp], "--resume", restarts=1, kill_at_step=17)
    assert agent.returncode == 0, agent.stderr[-3000:]
    assert (tmp / "elastic.killed-once").exists()  # the worker did die once
    assert "resumed from" in agent.stdout and "step-00000010 at step 10" in agent.stdout
    assert_same_run(tmp / "whole", tmp / "elastic", tolerance=1e-5)


def test_two_nodes_on_a_shared_folder_equal_one_node_with_two_processes(fsdp_gpt2):
    tmp, data, _ = fsdp_gpt2
    done = agents(tmp, "two_nodes", data, [tmp, tmp])
    assert all(agent.returncode == 0 for agent in done), done[0].stderr[-3000:]
    assert_same_run(tmp / "whole", tmp / "two_nodes", tolerance=1e-5)
    step_folder = complete_checkpoints(tmp / "two_nodes")[-1]
    for rank in range(2):  # both nodes' files are in the checkpoint and its manifest
        assert f"rank{rank}_state.safetensors" in manifest_names(step_folder)
        assert f"pytorch_model_fsdp_0/__{rank}_0.distcp" in manifest_names(step_folder)


def test_two_nodes_on_node_local_folders_are_refused_in_one_line(fsdp_gpt2, tmp_path):
    """The same relative run.output_dir, resolved on each "node" in its own folder, as on
    node-local disks."""
    _, data, _ = fsdp_gpt2
    data = {**data, "run": {**data["run"], "relative_output_dir": "runs/local"}}
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    done = agents(tmp_path, "local", data, nodes)
    assert all(agent.returncode != 0 for agent in done)
    errors = [line for agent in done for line in agent.stderr.splitlines()
              if line.startswith("hftrain: error:")]
    assert len(errors) == 1 and not any(  # torchrun's own report of the exit aside
        line.startswith("[rank") and "Traceback" in line
        for agent in done for line in agent.stderr.splitlines())
    assert "run.output_dir 'runs/local' must be on a filesystem every node shares" in errors[0]
    for node in nodes:  # nothing written, the probe removed
        assert list(node.iterdir()) == []


def cache_nodes(tmp_path: Path, corpus: Path, node1_text: str | None = None
                ) -> tuple[dict, list[Path]]:
    """Two "nodes", each with its own folder for the relative `data.cache` (as node-local
    disks) and, with `node1_text`, its own copy of the training file."""
    data = recipe_data(tmp_path, corpus)
    data["data"]["cache"] = "cache/tokens"
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node, text in zip(nodes, [None, node1_text], strict=True):
        node.mkdir()
        if node1_text is not None:
            (node / "train.txt").write_text(text or corpus.read_text(encoding="utf-8"),
                                            encoding="utf-8")
    if node1_text is not None:
        data["data"]["train_files"] = ["train.txt"]
    return data, nodes


def test_a_token_cache_on_node_local_disks_is_built_on_each_node(tmp_path, corpus_file):
    """A relative data.cache resolved in each node's own folder: each node builds its own
    copy, and the run equals the same two nodes on one shared cache, which only node 0
    builds."""
    data, nodes = cache_nodes(tmp_path, corpus_file)
    shared = json.loads(json.dumps(data))
    shared["data"]["cache"] = str(tmp_path / "shared-cache")
    done = agents(tmp_path, "whole", shared, nodes)
    assert all(agent.returncode == 0 for agent in done), done[0].stderr[-3000:]
    assert ["tokenize train" in agent.stderr for agent in done] == [True, False]
    done = agents(tmp_path, "local_cache", data, nodes)
    assert all(agent.returncode == 0 for agent in done), done[0].stderr[-3000:]
    assert all("tokenize train" in agent.stderr for agent in done)
    assert_same_run(tmp_path / "whole", tmp_path / "local_cache", tolerance=1e-5)
    tokens = {(folder / "train.bin").read_bytes() for folder in
              [tmp_path / "shared-cache", *(node / "cache" / "tokens" for node in nodes)]}
    assert len(tokens) == 1


def test_nodes_whose_data_files_differ_are_refused_in_one_line(tmp_path, corpus_file):
    """Each node tokenizes its own copy of train.txt into its own cache; node 1's copy has
    the same characters in another order."""
    lines = corpus_file.read_text(encoding="utf-8").splitlines(keepends=True)
    data, nodes = cache_nodes(tmp_path, corpus_file, node1_text="".join(reversed(lines)))
    done = agents(tmp_path, "different", data, nodes)
    assert all(agent.returncode != 0 for agent in done)
    errors = [line for agent in done for line in agent.stderr.splitlines()
              if line.startswith("hftrain: error:")]
    assert len(errors) == 1, done[0].stderr[-3000:]
    assert "the token caches built on" in errors[0] and "(rank 1) differ" in errors[0]
    assert not (tmp_path / "different").exists()  # nothing of the run written


# one refusal reaches every node the same way; the second kind runs with -m slow
@pytest.mark.parametrize("fault", [pytest.param("foreign_cache", marks=pytest.mark.slow),
                                   "missing_data"])
def test_a_refusal_on_one_node_only_is_one_line_and_stops_every_node(fault, tmp_path,
                                                                     corpus_file):
    """Node 1's own disk is wrong (its cache folder holds someone's files; its copy of the
    data is missing): node 0 does not wait for it in a collective, rank 0 says why."""
    data, nodes = cache_nodes(tmp_path, corpus_file, node1_text="")
    if fault == "foreign_cache":
        (nodes[1] / "cache" / "tokens").mkdir(parents=True)
        (nodes[1] / "cache" / "tokens" / "notes.txt").write_text("mine")
    else:
        (nodes[1] / "train.txt").unlink()
    done = agents(tmp_path, fault, data, nodes)
    assert all(agent.returncode != 0 for agent in done)
    errors = [line for agent in done for line in agent.stderr.splitlines()
              if line.startswith("hftrain: error:")]
    assert len(errors) == 1, done[0].stderr[-3000:]
    assert f"on {socket.gethostname()} (rank 1): " in errors[0]
    assert ("did not write" if fault == "foreign_cache" else "train.txt") in errors[0]
    assert not (tmp_path / fault).exists()
    if fault == "foreign_cache":
        assert (nodes[1] / "cache" / "tokens" / "notes.txt").read_text() == "mine"


def test_the_sharded_step_benchmark_runs_in_seconds():
    """benchmarks/sharded_step.py's smoke mode: one round of its DDP side on a tiny model
    (every side is the same code with other launch variables; the sharded launches
    themselves are this file's other tests, and each side here is half a minute of CI)."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sharded_step.py"),
                           "--rounds", "1", "--smoke", "--sides", "ddp"],
                          capture_output=True, text=True, cwd=REPO, timeout=TIME_LIMIT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["processes"] == 2 and set(report["tokens_per_s"]) == {"ddp"}
    assert len(report["tokens_per_s"]["ddp"]) == 1 and report["tokens_per_s"]["ddp"][0] > 0
    assert report["median_over_ddp"] == {}

def test_planted_metadata_cannot_patch_a_class_for_the_rest_of_the_process(fsdp_gpt2,
                                                                         tmp_path):
    """BUILD on an allowed class would set its attributes process-wide (here: make
    `Path / name` return a bare relative path); the metadata reader refuses it."""
    tmp, _, _ = fsdp_gpt2
    planted = tmp_path / "run" / "checkpoints" / "step-00000030"
    shutil.copytree(complete_checkpoints(tmp / "whole")[-1], planted)
    patch = (b"cpathlib\nPosixPath\n}(X\x0b\x00\x00\x00__truediv__"
             b"cpathlib\nPurePosixPath\nub.")
    (planted / "optimizer_0" / ".metadata").write_bytes(patch)
    reseal(planted)
    problem = damage(planted)
    assert problem is not None and "BUILD on a class is not allowed" in problem
    assert type(Path("/a") / "b") is type(Path("/a")) and str(Path("/a") / "b") == "/a/b"


def test_a_recipe_mistake_under_torchrun_is_said_once(tmp_path, corpus_file):
    data = recipe_data(tmp_path, corpus_file)
    data["model"]["n_layers"] = 2  # a typo of n_layer
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(json.dumps(data))
    proc = run_or_dump([TORCHRUN, "--nproc_per_node", "2", "-m", "hftrain", "train",
                        str(recipe)], TIME_LIMIT, cwd=REPO)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hftrain: error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-2000:]
    assert "model.n_layers" in errors[0] and str(recipe) in errors[0]



@pytest.fixture(scope="module")
def ddp_with_accumulation(tmp_path_factory, shakespeare_text):
    """The DDP run both ZeRO stages are compared with (run once: a 2-process launch is half
    a minute of CI): its folder, recipe data and result."""
    tmp = tmp_path_factory.mktemp("ddp-accumulation")
    corpus = tmp / "corpus.txt"
    corpus.write_text(shakespeare_text, encoding="utf-8")
    data = recipe_data(tmp, corpus)
    data["train"].update(batch_size=2, grad_accum_steps=2, grad_clip=0.05)
    ddp = launch(tmp, "ddp", data, fsdp=False)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    return tmp / "ddp", data, ddp


# ZeRO-2 by default (27 s alone on a 2-core EPYC); ZeRO-3, which partitions the parameters
# too, takes 59 s alone and 127 s beside another test in CI: with -m slow
@pytest.mark.parametrize("stage", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_deepspeed_zero_equals_ddp_with_accumulation_and_clipping(stage, tmp_path,
                                                                  ddp_with_accumulation):
    """Accumulation 2 (one update per two micro-batches) and a clipping norm that bites:
    the micro-batch, accumulation and clipping reach DeepSpeed, the loss is not divided by
    the accumulation twice, the schedule drives the engine's optimizer (ZeRO-3 regroups
    its parameters), and the seeded model is what ZeRO-3 partitions."""
    ddp_dir, data, ddp = ddp_with_accumulation
    zero = launch(tmp_path, "zero", data, f"deepspeed_zero{stage}")
    assert zero.returncode == 0, zero.stderr[-3000:]
    assert f"DEEPSPEED (gloo), mixed precision no, DeepSpeed ZeRO-{stage}" in zero.stdout
    assert_same_run(ddp_dir, tmp_path / "zero")
    assert sample_of(zero) == sample_of(ddp)
    checkpoint = complete_checkpoints(tmp_path / "zero")[-1]
    assert any(n.endswith("optim_states.pt") for n in manifest_names(checkpoint))
    assert damage(checkpoint) is None
    marker = tmp_path / "pickle-ran"  # a pickle planted in any DeepSpeed file never runs
    for original in sorted(checkpoint.rglob("*.pt")):
        planted = tmp_path / "planted" / checkpoint.name
        shutil.rmtree(planted.parent, ignore_errors=True)
        shutil.copytree(checkpoint, planted)
        torch.save({"loss_scaler": Planted(marker)}, planted / original.relative_to(checkpoint))
        reseal(planted)
        problem = damage(planted)
        assert problem is not None and "cannot be read safely" in problem, original.name
        assert not marker.exists(), f"the pickle planted in {original.name} ran"


@pytest.mark.slow  # a 2-process launch for a refusal hftrain.launch makes before training
def test_muon_under_deepspeed_is_refused_in_one_line(tmp_path, corpus_file):
    data = recipe_data(tmp_path, corpus_file)
    data["train"]["optimizer"] = "muon"
    proc = launch(tmp_path, "muon", data, "deepspeed_zero2")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hftrain: error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert "train.optimizer muon cannot run under DeepSpeed" in errors[0]
    assert not (tmp_path / "muon").exists()


def test_a_cache_run_checkpointed_on_two_processes_resumes_on_one(tmp_path, corpus_file):
    """With the token cache the blocks are one global order that any number of ranks share:
    a run killed on 2 processes (batch 4 each) and resumed on 1 (batch 8) trains on the same
    global batches and ends as the uninterrupted 2-process run."""
    data = recipe_data(tmp_path, corpus_file)
    data["data"]["cache"] = str(tmp_path / "cache")
    whole = launch(tmp_path, "whole", data, fsdp=False)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert launch(tmp_path, "moved", data, fsdp=False, kill_at_step=17).returncode != 0
    assert complete_checkpoints(tmp_path / "moved")[-1].name == "step-00000010"
    recipe, record = tmp_path / "moved.yaml", tmp_path / "moved-one.record"
    refused = subprocess.run([sys.executable, str(FAULTS), str(record), "0", "0", "--", "train",
                              str(recipe), "--resume"], capture_output=True, text=True,
                             cwd=REPO, timeout=TIME_LIMIT)
    assert refused.returncode == 2 and "set train.batch_size=8 to keep it" in refused.stderr
    resumed = subprocess.run([sys.executable, str(FAULTS), str(record), "0", "0", "--", "train",
                              str(recipe), "--resume", "train.batch_size=8"],
                             capture_output=True, text=True, cwd=REPO, timeout=TIME_LIMIT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step-00000010 at step 10" in resumed.stdout
    assert_same_run(tmp_path / "whole", tmp_path / "moved")


@pytest.mark.slow  # the cache variant above (resumed on 1 process) runs by default
def test_a_streamed_run_resumed_on_another_number_of_processes_is_refused(tmp_path,
                                                                         corpus_file):
    data = recipe_data(tmp_path, corpus_file)
    assert launch(tmp_path, "run", data, fsdp=False, kill_at_step=17).returncode != 0
    proc = subprocess.run([sys.executable, "-m", "hftrain", "train", str(tmp_path / "run.yaml"),
                           "--resume", "train.batch_size=8"], capture_output=True, text=True,
                          cwd=REPO, timeout=TIME_LIMIT)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hftrain: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "trained on 2 processes and this launch has 1: a streamed run resumes only" in errors[0]



def test_the_others_wait_for_a_token_cache_longer_than_the_collective_timeout(tmp_path,
                                                                            corpus_file):
    """Rank 0 builds the cache while the others wait: with collectives that time out after
    4 s (NCCL's default is 10 min) and a cache that takes 8 s, the run still starts."""
    data = recipe_data(tmp_path, corpus_file)
    data["data"]["cache"] = str(tmp_path / "cache")
    data["train"]["max_steps"] = 2
    data["run"]["output_dir"] = str(tmp_path / "run")
    recipe = tmp_path / "run.yaml"
    recipe.write_text(json.dumps(data))
    env = {**os.environ, "PG_TIMEOUT": "4", "SLOW_CACHE": "8", "OMP_NUM_THREADS": "1"}
    proc = run_or_dump([TORCHRUN, "--nproc_per_node", "2", str(FAULTS),
                        str(tmp_path / "record"), "0", "0", "--", "train", str(recipe)],
                       TIME_LIMIT, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "final" / "config.json").is_file()



@pytest.mark.slow  # one check among the nodes' agreements; data files differing runs by default
def test_two_nodes_started_with_different_recipes_are_refused_in_one_line(fsdp_gpt2,
                                                                         tmp_path):
    """Each node's agent is its own command line: a rank trained at another learning rate
    would write its shard into a run whose recipe says otherwise."""
    _, data, _ = fsdp_gpt2
    done = agents(tmp_path, "mixed", data, [tmp_path, tmp_path],
                  node_args=[[], ["train.lr=0.1"]])
    assert all(agent.returncode != 0 for agent in done)
    errors = [line for agent in done for line in agent.stderr.splitlines()
              if line.startswith("hftrain: error:")]
    assert len(errors) == 1 and "rank 1 differs from rank 0 in train.lr" in errors[0]
    assert not (tmp_path / "mixed").exists()


def test_a_tampered_random_state_or_a_linked_folder_marks_the_checkpoint_damaged(
        fsdp_gpt2, tmp_path):
    """Accelerate skips random states it cannot load without a word (the resumed run then
    differs); a folder of the checkpoint replaced by a link to a copy elsewhere is not the
    checkpoint either."""
    tmp, _, _ = fsdp_gpt2
    source = complete_checkpoints(tmp / "whole")[-1]
    marker = tmp_path / "pickle-ran"
    rng = tmp_path / "rng" / source.name
    shutil.copytree(source, rng)
    (rng / "random_states_0.pkl").write_bytes(pickle.dumps(Planted(marker)))
    reseal(rng)
    assert "random_states_0.pkl does not load as random states" in damage(rng)
    assert not marker.exists()
    linked = tmp_path / "linked" / source.name
    shutil.copytree(source, linked)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(linked / "optimizer_0"), elsewhere)
    (linked / "optimizer_0").symlink_to(elsewhere, target_is_directory=True)
    assert "is reached through a link" in damage(linked)


def test_the_deepspeed_zero_stage_is_part_of_the_launch_a_resume_checks():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from hftrain.launch import launch_trajectory
    from hftrain.resume import changed_keys

    def launch(stage: int) -> dict:
        plugin = SimpleNamespace(zero_stage=stage, deepspeed_config={})
        return launch_trajectory(SimpleNamespace(
            num_processes=2, distributed_type=DistributedType.DEEPSPEED,
            state=SimpleNamespace(deepspeed_plugin=plugin), mixed_precision="no",
            native_amp=False))

    assert launch(2)["launch.sharding"] == "DEEPSPEED ZeRO-2"
    assert changed_keys(launch(2), launch(3)) == [
        "launch.sharding ('DEEPSPEED ZeRO-2' -> 'DEEPSPEED ZeRO-3')"]
