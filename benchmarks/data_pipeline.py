"""The data path at real scale (issue 11): pipeline throughput against the raw tokenizer, the
token cache, resume cost, and peak memory on one large file.

A >= 50 MB corpus is built from the bundled texts (Tiny Shakespeare and the PTB splits,
interleaved and repeated) in three layouts: one .txt file, a JSON Lines file of ~2 KB
documents, and 8 .txt shards. A 32k byte-level BPE (hftrain's own builder) is trained on its
first few MB. Both are cached in the work folder and reused.

Default (throughput): in one run, side by side, every measurement in a fresh subprocess and
the order rotated each round (median of --rounds):
  - raw: `backend_tokenizer.encode_batch_fast` over the corpus in ~1 MB pieces, one thread
    (RAYON_NUM_THREADS=1, TOKENIZERS_PARALLELISM=false);
  - the pipeline: `DataStreams(...).train_batches(8)` of 1024-token blocks with
    data.num_workers 0, 1, 2, per layout, run as `hftrain` runs it; the rate is timed after
    a warm-up (see `measure_pipeline`), with the first-batch latency, the rate from start,
    CPU-seconds and peak RSS alongside;
  - the cache: `hftrain.data.cache.prepare` (what `hftrain prepare` runs) writes the
    memory-mapped token cache of the .txt layout once, timed; then the same loop reads it.
Targets: 2 workers >= 1.6x the raw rate (per layout); cache >= 10M tokens/s.

--resume: process start to first resumed step of `hftrain train --resume` at micro-batch 36
and 1600 (tiny GPT-2, block 1024, batch 1, the one-.txt corpus); target ratio <= 1.2.
--rss: peak RSS of `hftrain train` on a 200 MB one-document .txt; target <= 2 GB a process.
Both go through the CLI of the interpreter running this script (PYTHONPATH=... picks the
hftrain under test, e.g. an older checkout for "before" figures). The old pipeline reads a
one-document file whole: do not run --rss at 200 MB against it (tens of GB).

    python benchmarks/data_pipeline.py [--work DIR] [--rounds 3] [--json FILE]
    python benchmarks/data_pipeline.py --resume [--resume-steps 36,1600]
    python benchmarks/data_pipeline.py --rss [--rss-mb 200]
    python benchmarks/data_pipeline.py --work /tmp/smoke --mb 2 --tokenizer-mb 2 \
        --tokens 200000 --warmup-tokens 100000 --rounds 1 --resume --resume-steps 2,6 \
        --rss --rss-mb 5 --rss-steps 3 --throughput   # smoke test of everything
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

MB = 10**6
REPO = Path(__file__).resolve().parents[1]
SOURCES = [REPO / "recipes/data/tinyshakespeare.txt", *sorted(REPO.glob("recipes/data/ptb/*.txt"))]
SHARDS = 8
DOC_CHARS = 2048  # one JSON Lines document: ~2 KB of text, cut at a line end
PIECE_CHARS = 1 << 20  # raw encoding: ~1 MB per text
VAL_CHARS = 200_000  # the CLI runs' validation file: small, so the final evaluation is short
RESULT = "RESULT "  # prefix of the one stdout line a child process reports through


# --------------------------------------------------------------------------- corpus


def cut_at_lines(text: str, size: int) -> list[str]:
    """`text` in consecutive pieces of at least `size` characters (the last may be shorter),
    each ending at a line end, so that no word is split between two pieces."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def corpus_text(target_bytes: int) -> str:
    """The bundled texts interleaved (Shakespeare, PTB test, PTB valid, blank lines between)
    and repeated, cut at the first line end after `target_bytes` (the texts are ASCII)."""
    unit = "\n\n".join(p.read_text(encoding="utf-8").strip("\n") for p in SOURCES) + "\n\n"
    return cut_at_lines(unit * math.ceil(target_bytes / len(unit)), target_bytes)[0]


def build_corpus(work: Path, mb: float) -> dict[str, Any]:
    """corpus.txt, corpus.jsonl and shards/part-*.txt of the same text, reused when the
    manifest says they were built for this size and the files still have their sizes."""
    manifest_path = work / "corpus.json"
    target = int(mb * MB)
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest["target_bytes"] == target and all(
                Path(path).is_file() and Path(path).stat().st_size == size
                for path, size in manifest["files"].items()):
            return manifest
    print(f"building a {mb:g} MB corpus in {work} ...", flush=True)
    text = corpus_text(target)
    txt = work / "corpus.txt"
    txt.write_text(text, encoding="utf-8")
    docs = cut_at_lines(text, DOC_CHARS)
    jsonl = work / "corpus.jsonl"
    with jsonl.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    shards = cut_at_lines(text, math.ceil(len(text) / SHARDS))
    assert len(shards) == SHARDS, f"cut into {len(shards)} shards, not {SHARDS}"
    (work / "shards").mkdir(exist_ok=True)
    shard_paths = [work / "shards" / f"part-{i}.txt" for i in range(SHARDS)]
    for path, shard in zip(shard_paths, shards, strict=True):
        path.write_text(shard, encoding="utf-8")
    val = work / "val.txt"
    val.write_text(cut_at_lines(SOURCES[0].read_text(encoding="utf-8"), VAL_CHARS)[0])
    files = [txt, jsonl, *shard_paths, val]
    manifest = {"target_bytes": target, "txt": str(txt), "jsonl": str(jsonl),
                "shards": [str(p) for p in shard_paths], "val": str(val),
                "jsonl_documents": len(docs), "sources": [p.name for p in SOURCES],
                "files": {str(p): p.stat().st_size for p in files}}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return manifest


def layouts(corpus: dict[str, Any]) -> dict[str, tuple[list[str], str]]:
    """Layout name -> (train_files, data.format)."""
    return {"txt": ([corpus["txt"]], "text"), "jsonl": ([corpus["jsonl"]], "json"),
            "shards": (corpus["shards"], "text")}


# --------------------------------------------------------------------------- tokenizer


def prepare_tokenizer(work: Path, corpus_txt: str, vocab: int, train_mb: float) -> dict:
    """A byte-level BPE built the way hftrain builds one (`hftrain.tokenizer`), trained on the
    first `train_mb` MB of the corpus: training on all of it would take minutes and change
    neither the vocabulary's quality for this purpose nor the encoding speed. Saved with
    save_pretrained, so the CLI reuses it through tokenizer.name_or_path."""
    folder = work / f"tokenizer-{vocab}"
    record_path = work / f"tokenizer-{vocab}.json"
    with open(corpus_txt, encoding="utf-8") as f:
        head = f.read(int(train_mb * MB))  # characters; the corpus is nearly all ASCII
    record = {"vocab_size": vocab, "train_chars": len(head), "folder": str(folder),
              "trained_on": f"the first {len(head) / MB:.1f} MB of corpus.txt"}
    if record_path.is_file() and (folder / "tokenizer.json").is_file():
        saved = json.loads(record_path.read_text())
        if {k: saved.get(k) for k in record} == record:
            return saved
    from hftrain.recipe import TokenizerConfig
    from hftrain.tokenizer import build_tokenizer, save_tokenizer

    print(f"training a {vocab}-token byte-level BPE on {record['trained_on']} ...", flush=True)
    start = time.perf_counter()
    config = TokenizerConfig(kind="byte_bpe", vocab_size=vocab)
    tokenizer = build_tokenizer(config, cut_at_lines(head, 1 << 16), model_max_length=1024)
    save_tokenizer(tokenizer, folder)
    record["tokens"] = len(tokenizer)  # fewer than vocab when every word has become a token
    print(f"  done in {time.perf_counter() - start:.0f} s: {folder}", flush=True)
    record_path.write_text(json.dumps(record, indent=1))
    return record


# --------------------------------------------------------------------------- child processes


def run_child(spec: dict[str, Any], env: dict[str, str] | None, timeout: float) -> dict:
    """Run one measurement in a fresh interpreter (clean RSS, threads and imports) and return
    what it reports, or {"error": ...} with the end of its stderr."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"error": f"exit {done.returncode}: {tail}"}


def child_main(spec: dict[str, Any]) -> None:
    """Entry point of a child process: measure, print one RESULT line."""
    measure = {"raw": measure_raw, "pipeline": measure_pipeline, "prepare": measure_prepare,
               "cli": measure_cli}[spec["kind"]]
    try:
        result = measure(spec)
    except MissingFeature as exc:
        result = {"error": str(exc)}
    print(RESULT + json.dumps(result), flush=True)


class MissingFeature(Exception):
    """The hftrain under test lacks what a measurement needs (an older data pipeline)."""


def measure_raw(spec: dict[str, Any]) -> dict[str, Any]:
    """Single-threaded `encode_batch_fast` over ~1 MB pieces of the corpus, from its start,
    until `tokens` tokens: the rate one CPU gets from the tokenizer itself, no pipeline."""
    from hftrain.tokenizer import load_tokenizer

    backend = load_tokenizer(spec["tokenizer"]).backend_tokenizer
    pieces = cut_at_lines(Path(spec["txt"]).read_text(encoding="utf-8"), PIECE_CHARS)
    n_tokens, seconds, cpu, i = 0, 0.0, 0.0, 0
    while n_tokens < spec["tokens"]:
        batch, i = [pieces[i % len(pieces)]], i + 1
        start, start_cpu = time.perf_counter(), time.process_time()
        encodings = backend.encode_batch_fast(batch, add_special_tokens=False)
        seconds += time.perf_counter() - start
        cpu += time.process_time() - start_cpu
        n_tokens += sum(len(e.ids) for e in encodings)
    return {"tokens": n_tokens, "seconds": seconds, "tok_s": n_tokens / seconds,
            "tok_per_cpu_s": n_tokens / cpu, "peak_rss_mb": peak_rss_mb(resource.RUSAGE_SELF)}


def data_config(spec: dict[str, Any]) -> Any:
    """The DataConfig a recipe would give, with only the keys the spec sets. On a pipeline
    without `num_workers` (the old one), 0 workers is what it does anyway."""
    from hftrain.recipe import DataConfig

    fields = {f.name for f in dataclasses.fields(DataConfig)}
    wanted = {"train_files": spec["files"], "format": spec["format"], "sample_by": "document",
              "block_size": spec["block_size"], "num_workers": spec.get("workers"),
              "shuffle_tokens": spec.get("shuffle_tokens"), "cache": spec.get("cache")}
    wanted = {k: v for k, v in wanted.items() if v is not None}
    if wanted.get("num_workers") == 0 and "num_workers" not in fields:
        del wanted["num_workers"]
    missing = sorted(set(wanted) - fields)
    if missing:
        raise MissingFeature(f"DataConfig has no {', '.join(missing)}")
    return DataConfig(**wanted)


def measure_pipeline(spec: dict[str, Any]) -> dict[str, Any]:
    """Batches from `DataStreams.train_batches`: the first batch's latency (set-up, worker
    start, shuffle buffer fill), then `warmup_tokens` untimed, then the rate over `tokens`.

    The warm-up matters: while the first batch is awaited, workers tokenize ahead into the
    loader's prefetch queue (a few pieces of ~1 MiB each), and a window that started right
    away would count those already-made tokens as speed. Once the queue has drained, the
    window measures what the workers produce."""
    import psutil

    from hftrain.data import DataStreams
    from hftrain.tokenizer import load_tokenizer

    tokenizer, config, me = load_tokenizer(spec["tokenizer"]), data_config(spec), psutil.Process()
    start = time.perf_counter()
    batches = DataStreams(config, tokenizer, seed=0).train_batches(batch_size=spec["batch_size"])
    n_tokens = next(batches)["input_ids"].numel()
    first = time.perf_counter()
    while n_tokens < spec["warmup_tokens"]:
        n_tokens += next(batches)["input_ids"].numel()
    window_start, cpu_start, warm = time.perf_counter(), tree_cpu(me), n_tokens
    while n_tokens - warm < spec["tokens"]:
        n_tokens += next(batches)["input_ids"].numel()
    end, cpu = time.perf_counter(), tree_cpu(me) - cpu_start
    threads, workers = me.num_threads(), len(me.children(recursive=True))
    worker_peak = descendants_peak_rss_mb(me)  # before close() ends them
    batches.close()  # stops the workers
    counters = getattr(batches, "counters", {})  # what the stream read and tokenized
    window, seconds = n_tokens - warm, end - window_start
    return {"tokens": window, "first_batch_s": first - start, "tok_s": window / seconds,
            "overall_tok_s": n_tokens / (end - start),
            "tok_per_cpu_s": window / cpu if cpu > 0.1 else None,  # ticks are 10 ms
            "cpu_per_wall": cpu / seconds, "threads": threads, "child_processes": workers,
            "peak_rss_mb": peak_rss_mb(resource.RUSAGE_SELF),
            "worker_peak_rss_mb": worker_peak,
            **{f"read_{k}": v for k, v in counters.items()}}


def tree_cpu(process: Any) -> float:
    """User + system CPU-seconds of a process and its live descendants."""
    import psutil

    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        try:
            times = p.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def descendants_peak_rss_mb(process: Any) -> float:
    """The largest peak RSS (the kernel's VmHWM) among the live descendants, in MB. The data
    workers start from a fork server (`hftrain.workers`): they are its children, not this
    process's, so `RUSAGE_CHILDREN` never counts them (it read 0 since the server came)."""
    peak_kib = 0
    for child in process.children(recursive=True):
        try:
            status = Path(f"/proc/{child.pid}/status").read_text()
        except OSError:  # gone already, or not Linux
            continue
        found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
        peak_kib = max(peak_kib, int(found.group(1)) if found else 0)
    return peak_kib * 1024 / MB


def peak_rss_mb(who: int) -> float:
    """Peak RSS (the kernel's high-water mark) of this process, or of its largest reaped
    descendant, in MB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(who).ru_maxrss * 1024 / MB


# --------------------------------------------------------------------------- throughput


def pipeline_specs(args: argparse.Namespace, corpus: dict, tokenizer: str) -> dict[str, dict]:
    """Measurement name -> child spec, in the table's order."""
    common = {"tokenizer": tokenizer, "tokens": args.tokens, "warmup_tokens": args.warmup_tokens,
              "block_size": args.block_size, "batch_size": args.batch_size,
              "shuffle_tokens": args.shuffle_tokens}
    specs = {"raw encode_batch_fast, 1 thread": {**common, "kind": "raw", "txt": corpus["txt"]}}
    for layout, (files, fmt) in layouts(corpus).items():
        if layout not in args.layouts:
            continue
        for workers in args.workers:
            specs[f"{layout}, {workers} worker{'s' if workers != 1 else ''}"] = {
                **common, "kind": "pipeline", "files": files, "format": fmt,
                "workers": workers}
    if not args.no_cache:
        specs["cache (memory map), txt"] = {  # workers: how many tokenize while it is built
            **common, "kind": "pipeline", "files": [corpus["txt"]], "format": "text",
            "workers": max(args.workers), "cache": str(args.work / "cache")}
    return specs


def child_env(spec: dict[str, Any]) -> dict[str, str]:
    """The raw rate runs on one thread. The pipeline runs as `hftrain` runs it (the CLI sets
    TOKENIZERS_PARALLELISM=true unless the user set it)."""
    env = dict(os.environ)
    if spec["kind"] == "raw":
        env.update(RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    else:
        env.setdefault("TOKENIZERS_PARALLELISM", "true")
    return env


def throughput(args: argparse.Namespace, corpus: dict, tokenizer: str) -> dict[str, Any]:
    """Every measurement once per round, the order rotated each round so that a burst of
    load on a shared machine falls on different measurements; medians over rounds."""
    specs = pipeline_specs(args, corpus, tokenizer)
    cached = [spec for spec in specs.values() if spec.get("cache")]
    cache_build = build_cache(args, cached[0]) if cached else None
    names = list(specs)
    rounds: list[dict[str, dict]] = []
    for r in range(args.rounds):
        results = {}
        for name in names[r % len(names):] + names[:r % len(names)]:
            print(f"round {r + 1}/{args.rounds}: {name} ...", flush=True)
            results[name] = run_child(specs[name], child_env(specs[name]), args.timeout)
            if "error" in results[name]:
                print(f"  {results[name]['error']}", flush=True)
        rounds.append(results)
    summary = {name: median_fields([rnd[name] for rnd in rounds]) for name in names}
    return {"rounds": rounds, "median": summary, "cache_build": cache_build,
            "targets": throughput_targets(rounds, specs)}


def median_fields(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per numeric field, the median over the rounds that succeeded and have it."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return {"error": results[-1]["error"]}
    summary: dict[str, Any] = {"rounds_ok": len(ok)}
    for key in dict.fromkeys(k for r in ok for k in r):
        values = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
        if values:
            summary[key] = statistics.median(values)
    return summary


def throughput_targets(rounds: list[dict], specs: dict[str, dict]) -> dict[str, dict]:
    """Per layout, the 2-worker rate over the raw rate of the same round (median of the
    per-round ratios; target >= 1.6), and the cache's rate (target >= 10M tok/s)."""
    raw = next(name for name, spec in specs.items() if spec["kind"] == "raw")
    targets = {}
    for name, spec in specs.items():
        if spec["kind"] == "pipeline" and not spec.get("cache") and spec["workers"] == 2:
            ratios = [rnd[name]["tok_s"] / rnd[raw]["tok_s"] for rnd in rounds
                      if "error" not in rnd[name] and "error" not in rnd[raw]]
            targets[f"{name} / raw"] = {"ratio": statistics.median(ratios) if ratios else None,
                                        "target": 1.6}
        if spec.get("cache"):
            rates = [rnd[name]["tok_s"] for rnd in rounds if "error" not in rnd[name]]
            targets[f"{name} tok/s"] = {"value": statistics.median(rates) if rates else None,
                                        "target": 10e6}
    return targets


def build_cache(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    """Tokenize the corpus into the token cache once, timed (in a child, like every
    measurement). The folder is emptied first, so the time is always that of a build."""
    shutil.rmtree(spec["cache"], ignore_errors=True)
    print("building the token cache (hftrain.data.cache.prepare) ...", flush=True)
    result = run_child({**spec, "kind": "prepare"}, child_env(spec), args.timeout)
    if "error" in result:
        print(f"  {result['error']}", flush=True)
    return result


def measure_prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """What `hftrain prepare RECIPE` does for the data: `hftrain.data.cache.prepare` with the
    same DataConfig the cached measurement reads with (the cache is keyed by those settings,
    so a recipe with other val_files would make another cache)."""
    from hftrain.data import cache as token_cache
    from hftrain.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(spec["tokenizer"])
    config = data_config(spec)
    start = time.perf_counter()
    folder = Path(token_cache.prepare(config, tokenizer, show_progress=False))
    seconds = time.perf_counter() - start
    record = json.loads((folder / token_cache.CACHE_RECORD).read_text())
    tokens = sum(split.get("tokens", 0) for split in record.get("splits", {}).values())
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return {"seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds,
            "bytes": size, "workers": config.num_workers}


# --------------------------------------------------------------------------- CLI runs


def write_recipe(args: argparse.Namespace, corpus: dict, tokenizer: str, run_dir: Path,
                 files: list[str], data: dict[str, Any], max_steps: int,
                 log_interval: int = 100) -> Path:
    """A recipe for `hftrain`: a tiny GPT-2 (the data path, not the model, should dominate),
    block 1024, batch 1, the prepared tokenizer, a small validation file (unless `data` says
    otherwise), no evaluation during training, no sample, a checkpoint at the last step."""
    recipe = {
        "run": {"output_dir": str(run_dir), "seed": 0, "trackers": []},
        "tokenizer": {"kind": "byte_bpe", "vocab_size": args.vocab, "name_or_path": tokenizer},
        "data": {"train_files": files, "val_files": [corpus["val"]], "sample_by": "document",
                 "block_size": args.block_size, **data},
        "model": {"arch": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 64},
        "train": {"batch_size": 1, "max_steps": max_steps, "warmup_steps": 10,
                  "log_interval": log_interval},
        "checkpoint": {"interval": 0, "keep": 1},
        "eval": {"interval": 10**9, "max_batches": 1, "batch_size": 1},
        "sample": {"max_new_tokens": 0},
    }
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def logged_step(metrics: Path, step: int) -> bool:
    """Whether metrics.jsonl holds the training record of `step` (a torn last line is
    skipped: the process may be writing it)."""
    try:
        lines = metrics.read_text(encoding="utf-8").splitlines()
    except OSError:
        return False
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("step") == step and "loss" in record:
            return True
    return False


def run_cli(argv: list[str], log: Path, cwd: Path, timeout: float, metrics: Path | None = None,
            step: int | None = None, stop_there: bool = False,
            rss: bool = False) -> dict[str, Any]:
    """Run `python -m hftrain ARGV` (this interpreter, so the hftrain under test), output to
    `log`. Time from process start to the moment `metrics` records `step` (polled every
    20 ms); with `stop_there`, then stop the run (SIGTERM: hftrain checkpoints and exits),
    sparing the final evaluation and export. With `rss`, sample the tree's memory."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start, first_step = time.perf_counter(), None
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "hftrain", *argv], stdout=out,
                                stderr=subprocess.STDOUT, cwd=cwd)
        peaks = TreePeaks(proc.pid) if rss else None
        while proc.poll() is None:
            now = time.perf_counter() - start
            if peaks and now - peaks.last >= 0.1:
                peaks.sample(now)
            if first_step is None and step is not None and logged_step(metrics, step):
                first_step = now
            if now > timeout or (stop_there and first_step is not None):
                stop(proc)
                break
            time.sleep(0.02)
    wall = time.perf_counter() - start
    if first_step is None and step is not None and logged_step(metrics, step):
        first_step = wall  # logged between the last poll and the exit: an upper bound
    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
    result = {"exit": proc.returncode, "wall_s": wall, "first_step_s": first_step,
              "stopped": stop_there and first_step is not None, "timed_out": wall > timeout,
              "log": str(log), "log_tail": " | ".join(tail)}
    return result | (peaks.summary() if peaks else {})


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (hftrain saves a checkpoint and exits), SIGKILL if it has not within 2 min."""
    proc.terminate()
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class TreePeaks:
    """Peak RSS of a process and its descendants (data workers), sampled: the largest single
    process and the largest sum over the tree."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.per_process = self.tree = 0
        self.samples, self.last = 0, -1.0

    def sample(self, now: float) -> None:
        import psutil

        self.samples, self.last = self.samples + 1, now
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        total = 0
        for p in procs:
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            self.per_process = max(self.per_process, rss)
        self.tree = max(self.tree, total)

    def summary(self) -> dict[str, Any]:
        return {"sampled_peak_rss_mb": self.per_process / MB,
                "sampled_peak_tree_rss_mb": self.tree / MB, "rss_samples": self.samples}


def measure_cli(spec: dict[str, Any]) -> dict[str, Any]:
    """Child entry: one CLI run, plus the kernel's exact peak RSS of the largest process it
    started and reaped (this child starts nothing else)."""
    result = run_cli(spec["argv"], Path(spec["log"]), Path(spec["cwd"]), spec["timeout"],
                     Path(spec["metrics"]), spec["step"], stop_there=True, rss=True)
    return result | {"peak_rss_mb": peak_rss_mb(resource.RUSAGE_CHILDREN)}


# --------------------------------------------------------------------------- resume


def hftrain_folder() -> Path:
    """The hftrain package under test (the one this interpreter imports: PYTHONPATH counts)."""
    return Path(importlib.util.find_spec("hftrain").submodule_search_locations[0])


def hftrain_fingerprint() -> str:
    """A hash of the hftrain sources under test: a prepared run is reused only by the code
    that wrote its checkpoint."""
    folder = hftrain_folder()
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.py")):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def prepare_resume_run(args: argparse.Namespace, recipe: Path, step: int) -> Path:
    """A run folder trained to `step` micro-batches (batch 1, no accumulation: step ==
    micro-batch), with its checkpoint there. Each step gets its own run, since checkpoint.keep
    would delete the early one. Reused while the recipe and hftrain are unchanged."""
    root = recipe.parent
    folder, record_path = root / f"prep-{step}", root / f"prep-{step}.json"
    record = {"recipe": recipe.read_text(), "overrides": args.override, "step": step,
              "hftrain": hftrain_fingerprint()}
    if record_path.is_file() and json.loads(record_path.read_text()) == record \
            and (folder / "final").is_dir():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    print(f"training the run to resume at micro-batch {step} ...", flush=True)
    result = run_cli(["train", str(recipe), f"run.output_dir={folder}",
                      f"train.max_steps={step}", *args.override],
                     root / f"prep-{step}.log", args.work, args.timeout)
    if result["exit"] != 0:
        raise SystemExit(f"preparing the run at step {step} failed: {result['log_tail']}")
    record_path.write_text(json.dumps(record, indent=1))
    return folder


def time_resume(args: argparse.Namespace, recipe: Path, prepared: Path, step: int) -> dict:
    """Process start to the first resumed step, on a fresh copy of the prepared run."""
    scratch = recipe.parent / "timed"
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(prepared, scratch)
    log = recipe.parent / f"resume-{step}.log"
    result = run_cli(["train", str(recipe), "--resume", f"run.output_dir={scratch}",
                      f"train.max_steps={step + 1}", "train.log_interval=1", *args.override],
                     log, args.work, args.timeout, scratch / "metrics.jsonl", step + 1,
                     stop_there=True)
    if result["first_step_s"] is None or f"at step {step}" not in log.read_text():
        return {"error": f"no resumed step {step + 1} logged: {result['log_tail']}"}
    return result


def resume_benchmark(args: argparse.Namespace, corpus: dict, tokenizer: str) -> dict:
    """The same recipe resumed at each micro-batch, alternating, median of --rounds."""
    root = args.work / "resume"
    recipe = write_recipe(args, corpus, tokenizer, root / "run", [corpus["txt"]], {},
                          max_steps=max(args.resume_steps))
    prepared = {step: prepare_resume_run(args, recipe, step) for step in args.resume_steps}
    times: dict[int, list[dict]] = {step: [] for step in args.resume_steps}
    for r in range(args.rounds):
        order = args.resume_steps if r % 2 == 0 else args.resume_steps[::-1]
        for step in order:
            print(f"round {r + 1}/{args.rounds}: resume at micro-batch {step} ...", flush=True)
            times[step].append(time_resume(args, recipe, prepared[step], step))
    median = {step: median_fields(results) for step, results in times.items()}
    first, last = min(args.resume_steps), max(args.resume_steps)
    ratio = None
    if "error" not in median[first] and "error" not in median[last]:
        ratio = median[last]["first_step_s"] / median[first]["first_step_s"]
    return {"rounds": {str(k): v for k, v in times.items()},
            "median": {str(k): v for k, v in median.items()},
            "ratio": ratio, "target": 1.2, "steps": [first, last]}


# --------------------------------------------------------------------------- peak RSS


def build_big_file(work: Path, corpus_txt: str, mb: float) -> Path:
    """One document of `mb` MB: the corpus repeated (reused when it has the size)."""
    path = work / f"one-document-{mb:g}mb.txt"
    text = Path(corpus_txt).read_text(encoding="utf-8")
    copies = math.ceil(mb * MB / len(text.encode("utf-8")))
    size = copies * len(text.encode("utf-8"))
    if not path.is_file() or path.stat().st_size != size:
        print(f"writing {path} ({size / MB:.0f} MB) ...", flush=True)
        with path.open("w", encoding="utf-8") as f:
            for _ in range(copies):
                f.write(text)
    return path


def rss_benchmark(args: argparse.Namespace, corpus: dict, tokenizer: str) -> dict[str, Any]:
    """`hftrain train` on the big one-document file, validating on its last 10% as the bundled
    recipes do (data.val_fraction), stopped once step --rss-steps is logged (the final
    evaluation of 20 MB would take long on CPU and is not what this measures). It runs in a
    child that reads the exact peak RSS of the training process and its reaped workers."""
    big = build_big_file(args.work, corpus["txt"], args.rss_mb)
    run_dir = args.work / "runs" / "rss"
    shutil.rmtree(run_dir, ignore_errors=True)
    recipe = write_recipe(args, corpus, tokenizer, run_dir, [str(big)], {"val_files": []},
                          max_steps=args.rss_steps, log_interval=1)
    spec = {"kind": "cli", "argv": ["train", str(recipe), *args.override],
            "log": str(args.work / "logs" / "rss.log"), "cwd": str(args.work),
            "timeout": args.timeout, "metrics": str(run_dir / "metrics.jsonl"),
            "step": args.rss_steps}
    print(f"training {args.rss_steps} steps on {big.name} ...", flush=True)
    result = run_child(spec, None, args.timeout + 120)
    return {"file": str(big), "file_mb": big.stat().st_size / MB, "steps": args.rss_steps,
            **result, "target_mb": 2000}


# --------------------------------------------------------------------------- report


def rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:,.0f}k"


def throughput_table(result: dict[str, Any]) -> str:
    """Markdown, medians over rounds: tok/s after the warm-up, and from start (the first
    batch's wait included); tok/CPU-s and CPU/wall count the workers too."""
    raw = result["median"]["raw encode_batch_fast, 1 thread"].get("tok_s")
    lines = ["| measurement | tok/s | x raw | tok/s from start | first batch s | tok/CPU-s "
             "| CPU/wall | peak RSS MB (main / workers) |", "|---|---|---|---|---|---|---|---|"]
    for name, m in result["median"].items():
        if "error" in m:
            lines.append(f"| {name} | error: {m['error']} | | | | | | |")
            continue
        ratio = f"{m['tok_s'] / raw:.2f}" if raw else "-"
        first = f"{m['first_batch_s']:.2f}" if "first_batch_s" in m else "-"
        share = f"{m['cpu_per_wall']:.2f}" if "cpu_per_wall" in m else "1 thread"
        workers = f" / {m['worker_peak_rss_mb']:,.0f}" if "worker_peak_rss_mb" in m else ""
        lines.append(f"| {name} | {rate(m['tok_s'])} | {ratio} | {rate(m.get('overall_tok_s'))}"
                     f" | {first} | {rate(m.get('tok_per_cpu_s'))} | {share} | "
                     f"{m['peak_rss_mb']:,.0f}{workers} |")
    return "\n".join(lines)


def verdict(value: float | None, target: float | None, at_most: bool = False) -> str:
    if value is None or target is None:
        return "n/a"
    return "PASS" if (value <= target if at_most else value >= target) else "FAIL"


def throughput_report(result: dict[str, Any]) -> str:
    lines = [throughput_table(result), ""]
    build = result["cache_build"]
    if build and "error" in build:
        lines.append(f"cache build: error: {build['error']}")
    elif build:
        lines.append(f"cache build (once, {build['workers']} workers): {build['seconds']:.1f} s "
                     f"for {build['tokens']:,} tokens ({rate(build['tok_s'])} tok/s), "
                     f"{build['bytes'] / MB:.1f} MB")
    for name, t in result["targets"].items():
        if "ratio" in t:
            value = f"{t['ratio']:.2f}x" if t["ratio"] is not None else "-"
            lines.append(f"target {name} >= {t['target']}x: {value} "
                         f"{verdict(t['ratio'], t['target'])}")
        else:
            lines.append(f"target {name} >= {rate(t['target'])}: {rate(t['value'])} "
                         f"{verdict(t['value'], t['target'])}")
    return "\n".join(lines)


def resume_report(result: dict[str, Any]) -> str:
    lines = ["| resumed at micro-batch | process start to first resumed step, s | rounds |",
             "|---|---|---|"]
    for step, m in result["median"].items():
        if "error" in m:
            lines.append(f"| {step} | error: {m['error']} | |")
        else:
            lines.append(f"| {step} | {m['first_step_s']:.2f} | {m['rounds_ok']} |")
    first, last = result["steps"]
    ratio = f"{result['ratio']:.2f}x" if result["ratio"] is not None else "-"
    lines.append(f"\ntarget {last} / {first} <= {result['target']}x: {ratio} "
                 f"{verdict(result['ratio'], result['target'], at_most=True)}")
    return "\n".join(lines)


def rss_report(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"peak RSS run: error: {result['error']}"
    first = result["first_step_s"]
    ok = "stopped there" if result["stopped"] else \
        f"never logged; exit {result['exit']}: {result['log_tail']}"
    first = f"{first:.1f} s" if first is not None else "-"
    return "\n".join([
        f"{result['file_mb']:.0f} MB one-document .txt: step {result['steps']} logged after "
        f"{first} from process start ({ok})",
        f"peak RSS of one process: {result['peak_rss_mb']:,.0f} MB (kernel high-water mark; "
        f"sampled every 0.1 s: {result['sampled_peak_rss_mb']:,.0f} MB); whole process tree, "
        f"sampled: {result['sampled_peak_tree_rss_mb']:,.0f} MB",
        f"target one process <= {result['target_mb']} MB: "
        f"{verdict(result['peak_rss_mb'], result['target_mb'], at_most=True)}"])


def machine_info() -> dict[str, Any]:
    from importlib.metadata import version

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "commit": commit, "hftrain": str(hftrain_folder()),
            "hftrain_sources": hftrain_fingerprint(),
            "data_package": (hftrain_folder() / "data" / "__init__.py").is_file(),
            **{pkg: version(pkg) for pkg in ("tokenizers", "transformers", "datasets",
                                             "torch")}}


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",")]

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/hftrain-bench-data"),
                   help="folder for the corpus, tokenizer, cache and runs (reused)")
    p.add_argument("--mb", type=float, default=52, help="corpus size, MB (10^6 bytes)")
    p.add_argument("--vocab", type=int, default=32768, help="tokenizer vocab_size")
    p.add_argument("--tokenizer-mb", type=float, default=5,
                   help="train the tokenizer on this many MB of the corpus")
    p.add_argument("--rounds", type=int, default=3, help="repetitions; medians are reported")
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    t = p.add_argument_group("throughput (the default)")
    t.add_argument("--throughput", action="store_true",
                   help="measure throughput also when --resume or --rss is given")
    t.add_argument("--tokens", type=int, default=8_000_000, help="tokens timed per measurement")
    t.add_argument("--warmup-tokens", type=int, default=3_000_000,
                   help="pipeline tokens read before the timed window (drains the prefetch)")
    t.add_argument("--workers", type=ints, default=[0, 1, 2], help="data.num_workers values")
    t.add_argument("--layouts", type=lambda s: s.split(","), default=["txt", "jsonl", "shards"],
                   help="corpus layouts to stream")
    t.add_argument("--batch-size", type=int, default=8, help="blocks per batch")
    t.add_argument("--block-size", type=int, default=1024, help="data.block_size")
    t.add_argument("--shuffle-tokens", type=int, default=None,
                   help="data.shuffle_tokens; unset: DataConfig's default")
    t.add_argument("--no-cache", action="store_true", help="skip the token-cache measurement")
    r = p.add_argument_group("resume and memory (hftrain train through the CLI)")
    r.add_argument("--resume", action="store_true", help="time resumes at --resume-steps")
    r.add_argument("--resume-steps", type=ints, default=[36, 1600],
                   help="micro-batches to resume at; the ratio is last / first")
    r.add_argument("--rss", action="store_true", help="peak RSS on a big one-document .txt")
    r.add_argument("--rss-mb", type=float, default=200, help="size of the one-document file")
    r.add_argument("--rss-steps", type=int, default=5, help="steps to train on it")
    r.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra recipe override for every CLI run (e.g. data.num_workers=2)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.work = args.work.resolve()
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        child_main(json.loads(args.child))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(args.work, args.mb)
    tok = prepare_tokenizer(args.work, corpus["txt"], args.vocab, args.tokenizer_mb)
    report: dict[str, Any] = {"machine": machine_info(), "corpus": corpus, "tokenizer": tok,
                              "settings": {k: str(v) if isinstance(v, Path) else v
                                           for k, v in vars(args).items() if k != "child"}}
    print(f"corpus: {corpus['target_bytes'] / MB:g} MB ({corpus['jsonl_documents']:,} JSON "
          f"Lines documents, {SHARDS} shards); tokenizer: byte-level BPE, vocab_size "
          f"{args.vocab} ({tok['tokens']:,} tokens learned) trained on "
          f"{tok['trained_on']}; {report['machine']['cpu']}, {report['machine']['cores']} cores")
    sections = []
    if args.throughput or not (args.resume or args.rss):
        report["throughput"] = throughput(args, corpus, tok["folder"])
        sections.append(throughput_report(report["throughput"]))
    if args.resume:
        report["resume"] = resume_benchmark(args, corpus, tok["folder"])
        sections.append(resume_report(report["resume"]))
    if args.rss:
        report["rss"] = rss_benchmark(args, corpus, tok["folder"])
        sections.append(rss_report(report["rss"]))
    print("\n" + "\n\n".join(sections))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
