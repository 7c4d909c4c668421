"""lm-eval against `hftrain eval` on the same held-out text: bits per byte and total NLL.

    pip install -e ".[eval]"
    python benchmarks/lm_eval_agreement.py [--work-dir /tmp/hftrain-lm-eval] [--steps 300]

Trains three small models with hftrain on the bundled corpora (a char GPT-2 and a byte-level
BPE GPT-2 on Tiny Shakespeare, a word LSTM on Penn Treebank; short runs of the shipped
recipes), then scores each export on a held-out text taken as ONE document:

- Tiny Shakespeare: the last 10% of the file (the recipes' validation split);
- Penn Treebank: `ptb.test.txt` (the LSTM recipe's validation split), line breaks included.

Each export goes through `hftrain eval EXPORT --data TEXT --tasks TASK --json` once: `--data`
is hftrain's own sliding-window scorer, `--tasks` runs lm-eval's `loglikelihood_rolling` on a
local task whose single document is the same text, with lm-eval's HFLM loading the export
folder (`trust_remote_code` for the LSTM) and `max_length` = hftrain's `--block-size`, so the
two score the text in the same windows. lm-eval's total NLL is recovered from its
`bits_per_byte` (= -sum(loglikelihood) / UTF-8 bytes / ln 2, bytes of the task's target text).

What to expect: lm-eval puts its prefix token (the tokenizer's BOS) before the text and
scores every text token; hftrain scores the text the same way and also the EOS that ends the
document, so hftrain's total NLL is higher by about one token's NLL. lm-eval's last window
is right-aligned (a full window of context), hftrain's starts where the previous one ended:
the last partial window's tokens see less context in hftrain.

Prints a markdown table (and writes it with the raw figures to WORK_DIR/results.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from hftrain.harness import write_rolling_task

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "recipes" / "data" / "tinyshakespeare.txt"
PTB_TEST = REPO / "recipes" / "data" / "ptb" / "ptb.test.txt"

def models(steps: int) -> list[dict]:
    """The three runs: recipe, short-run overrides, held-out text, eval options."""
    return [
        {"name": "gpt2-char", "kind": "char", "recipe": "recipes/shakespeare/gpt2-char.yaml",
         "overrides": [f"train.max_steps={steps}"], "text": "shakespeare", "remote": False},
        {"name": "gpt2-bpe", "kind": "byte_bpe", "recipe": "recipes/shakespeare/gpt2-bpe.yaml",
         "overrides": [f"train.max_steps={steps}"], "text": "shakespeare", "remote": False},
        # 212 steps = 2 epochs of ptb.valid.txt in 20 lanes of 35 tokens
        {"name": "lstm-word", "kind": "word", "recipe": "recipes/ptb/lstm-word.yaml",
         "overrides": ["train.max_steps=212", "eval.interval=212"], "text": "ptb",
         "remote": True},
    ]


def held_out_texts(work: Path, chars: int | None = None) -> dict[str, Path]:
    """One file per held-out text, each scored as one document (Shakespeare's cut to its
    first `chars` characters if given: the smoke test's)."""
    shakespeare = SHAKESPEARE.read_text(encoding="utf-8")
    cut = int(len(shakespeare) * 0.9)  # the recipes' val_fraction 0.1 (an ASCII file)
    path = work / "texts" / "shakespeare_last10.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(shakespeare[cut:][:chars], encoding="utf-8")
    return {"shakespeare": path, "ptb": PTB_TEST}


def local_task(work: Path, name: str, text_file: Path) -> Path:
    """A folder holding a loglikelihood_rolling task whose one document is `text_file`."""
    folder = work / "tasks" / name
    write_rolling_task(folder, name, [text_file.read_text(encoding="utf-8")])
    return folder


def hftrain(*args: str) -> str:
    """Run the hftrain CLI; its stdout."""
    proc = subprocess.run([sys.executable, "-m", "hftrain", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"hftrain {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def train(work: Path, run: dict) -> Path:
    out = work / "runs" / run["name"]
    export = out / "final"
    if not export.is_dir():
        hftrain("train", run["recipe"], f"run.output_dir={out}", "run.overwrite=true",
                "sample.max_new_tokens=1", *run["overrides"])
    return export


def block_size(export: Path) -> int:
    import yaml

    recipe = yaml.safe_load((export / "hftrain_recipe.yaml").read_text(encoding="utf-8"))
    return int(recipe["data"]["block_size"])


def compare(work: Path, run: dict, text_file: Path) -> dict:
    export = train(work, run)
    task_name = f"hftrain_{run['text']}"
    tasks = local_task(work, task_name, text_file)
    block = block_size(export)
    started = time.perf_counter()
    out = hftrain("eval", export, "--data", text_file, "--tasks", task_name,
                  "--include-path", tasks, "--block-size", block, "--batch-size", 32, "--json",
                  *(["--trust-remote-code"] if run["remote"] else []))
    seconds = time.perf_counter() - started
    result = json.loads(out.strip().splitlines()[-1])
    text_bytes = len(text_file.read_text(encoding="utf-8").encode("utf-8"))
    lm_bpb = result["tasks"][task_name]["bits_per_byte"]
    lm_nll = lm_bpb * text_bytes * math.log(2)
    hf_nll = result.get("nll")
    return {
        "model": run["name"], "tokenizer": run["kind"], "text": text_file.name,
        "block_size": block, "bytes_text": text_bytes, "bytes_hftrain": result.get("bytes"),
        "tokens_hftrain": result["tokens"], "lm_eval_bpb": lm_bpb,
        "hftrain_bpb": result["bits_per_byte"], "lm_eval_nll": lm_nll, "hftrain_nll": hf_nll,
        "eval_seconds": round(seconds, 1),
    }


def relative(a: float | None, b: float) -> str:
    return "n/a" if a is None else f"{(a - b) / b:+.4%}"


def table(rows: list[dict]) -> str:
    lines = ["| model | tokenizer | lm-eval bits/byte | hftrain bits/byte | rel. diff | "
             "lm-eval total NLL | hftrain total NLL | rel. diff |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hf_nll = "n/a (no `nll` key)" if r["hftrain_nll"] is None else f"{r['hftrain_nll']:,.2f}"
        lines.append(
            f"| {r['model']} | {r['tokenizer']} | {r['lm_eval_bpb']:.4f} | "
            f"{r['hftrain_bpb']:.4f} | {relative(r['hftrain_bpb'], r['lm_eval_bpb'])} | "
            f"{r['lm_eval_nll']:,.2f} | {hf_nll} | "
            f"{relative(r['hftrain_nll'], r['lm_eval_nll'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/hftrain-lm-eval"))
    parser.add_argument("--steps", type=int, default=300, help="training steps of the GPT-2s")
    parser.add_argument("--only", nargs="*", default=None,
                        help="model names to run (gpt2-char gpt2-bpe lstm-word)")
    parser.add_argument("--text-chars", type=int, default=None,
                        help="score only this many characters of the Shakespeare text")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        sys.exit("needs lm-eval: pip install -e '.[eval]'")
    started = time.perf_counter()
    work = args.work_dir.resolve()
    texts = held_out_texts(work, args.text_chars)
    rows = []
    for run in models(args.steps):
        if args.only and run["name"] not in args.only:
            continue
        rows.append(compare(work, run, texts[run["text"]]))
        print(f"{run['name']}: done at {time.perf_counter() - started:.0f} s", file=sys.stderr)
    report = table(rows)
    print(report)
    for r in rows:
        print(f"- {r['model']}: {r['text']}, block {r['block_size']}, "
              f"{r['tokens_hftrain']:,} tokens scored by hftrain, text {r['bytes_text']:,} bytes, "
              f"hftrain counted {r['bytes_hftrain'] if r['bytes_hftrain'] is not None else 'n/a'}"
              f"; eval {r['eval_seconds']} s")
    total = time.perf_counter() - started
    print(f"total {total:.0f} s (training included)")
    (work / "results.json").write_text(json.dumps({"rows": rows, "table": report,
                                                   "seconds": round(total, 1)}, indent=1))


if __name__ == "__main__":
    main()
