"""Command line: `hftrain {tokenizer,train,eval,generate,push} ...`.

Mistakes in the user's input (recipe keys, paths, data) end with one line on stderr and exit
status 2; tracebacks are kept for bugs.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from hftrain.errors import (
    DataError,
    HftrainError,
    RecipeError,
    ReportedByMainProcess,
    TrainingDiverged,
)


def _quiet_libraries() -> None:
    """Keep the terminal for hftrain's own progress bar and results."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    import datasets
    import transformers

    # Saving a model with tied embeddings as safetensors stores the shared tensor once;
    # Accelerate warns about it on every checkpoint although reloading re-ties it.
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    # Their "Failed to load JSON from file ..." comes just before the error it describes,
    # which hftrain reports itself as one line naming the file and line (hftrain.data_check).
    for builder in ("json.json", "parquet.parquet"):
        logging.getLogger(f"datasets.packaged_modules.{builder}").setLevel(logging.CRITICAL)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def cmd_tokenizer(args: argparse.Namespace) -> None:
    from hftrain.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    _build_run_tokenizer(recipe, Path(args.recipe), already="nothing to build")


def _build_run_tokenizer(recipe: Any, recipe_path: Path, already: str) -> Any:
    """The recipe's tokenizer, built and saved into <output_dir>/tokenizer if it is not
    there yet (or reused, as `train` would)."""
    from hftrain.lifecycle import RunFolder

    with RunFolder(recipe, recipe_path) as run_folder:
        tokenizer, folder = run_folder.build_tokenizer()
    if folder is None:
        print(f"tokenizer already present ({len(tokenizer)} tokens); {already}")
    else:
        print(f"built a {recipe.tokenizer.kind} tokenizer of {len(tokenizer)} tokens: {folder}")
    return tokenizer


def cmd_prepare(args: argparse.Namespace) -> None:
    """The tokenizer (as `hftrain tokenizer`), then the token cache `data.cache` names."""
    from hftrain.data import cache as token_cache
    from hftrain.lifecycle import RunFolder
    from hftrain.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if not recipe.data.cache:
        raise HftrainError(f"{args.recipe} sets no data.cache: add data.cache=FOLDER to say "
                           "where the token cache goes")
    RunFolder(recipe, Path(args.recipe)).check_cache_target()
    tokenizer = _build_run_tokenizer(recipe, Path(args.recipe), already="reusing it")
    for alone in recipe.data.by_source():  # a mixture: one cache per source, in FOLDER/NAME
        folder = token_cache.prepare(alone, tokenizer)
        record = token_cache.read_record(folder)
        counts = ", ".join(f"{split} {n['tokens']:,} tokens"
                           for split, n in record["splits"].items())
        print(f"token cache {folder}: {counts}")


def resume_command(args: argparse.Namespace) -> str:
    """The command that continues this run: the same recipe and overrides, plus --resume."""
    kept = [o for o in args.overrides if not o.startswith(("run.overwrite=", "checkpoint.resume="))]
    launcher = "hftrain" if "WORLD_SIZE" not in os.environ else "<the same launcher> -m hftrain"
    return f"{launcher} train {shlex.join([args.recipe, *kept])} --resume"


def cmd_train(args: argparse.Namespace) -> None:
    from hftrain.recipe import load_recipe
    from hftrain.workers import start_worker_server

    overrides = [*args.overrides, *(["checkpoint.resume=auto"] if args.resume else [])]
    recipe = load_recipe(args.recipe, overrides)
    if recipe.data.num_workers:
        start_worker_server()  # its imports overlap ours: seconds before the first batch

    from accelerate import PartialState

    from hftrain.errors import ResumableError, RunStopped
    from hftrain.train import train

    crashed = None
    try:
        result = train(recipe, Path(args.recipe))
    except RunStopped as stop:
        if PartialState().is_main_process:
            advice = stop.advice or ("the run's last step is checkpointed. Finish it with: "
                                     f"{resume_command(args)}")
            print(f"hftrain: stopped during {stop.phase}; {advice}", file=sys.stderr)
        sys.exit(128 + stop.signum)
    except ResumableError as failed:
        crashed, hint = failed.cause, (f"the run is saved at {failed.checkpoint}; continue "
                                       f"it with: {resume_command(args)}")
        if isinstance(crashed, HftrainError):  # one line, of its own kind (said once a node)
            crashed.args = (f"{crashed}. {hint[0].upper()}{hint[1:]}",)
            raise crashed from None
        print(f"hftrain: {hint}", file=sys.stderr)
    if crashed is not None:  # raised outside the handler: its traceback as it was
        raise crashed
    if not PartialState().is_main_process:  # asked only now: Accelerator() set the state up
        return
    if result.already_finished:
        print(f"{result.run_dir} already finished its {result.step} steps (export: "
              f"{result.final_dir}); nothing to do. Raise train.max_steps to train on")
        return
    if result.interrupted:
        print(f"hftrain: stopped at step {result.step}; checkpoint saved to "
              f"{result.checkpoint}. Continue with: {resume_command(args)}", file=sys.stderr)
        sys.exit(128 + result.interrupted)
    print(result.validation_line())
    print(f"{trained_steps(result.step - result.steps_run, result.step)} in "
          f"{result.train_seconds:.1f} s; model exported to {result.final_dir}")
    if result.sample:
        print(f"sample:\n{result.sample}")


def trained_steps(first: int, last: int) -> str:
    """What this invocation trained: all of a new run's steps, or after a resume the steps
    it added and where it took over (never the run's total as if this run had made it)."""
    if first == 0:
        return f"trained {last} steps"
    if first == last:  # the run was checkpointed at its end: evaluated and exported only
        return f"trained 0 steps (resumed at step {last})"
    return (f"trained steps {first + 1}-{last} ({last - first} steps this run, resumed at "
            f"step {first})")


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from hftrain.generation import generate_text, load_export

    torch.manual_seed(args.seed)
    model, tokenizer = load_export(args.export, trust_remote_code=args.trust_remote_code)
    for _ in range(args.num_samples):
        print(generate_text(model, tokenizer, args.prompt, args.max_new_tokens,
                            args.temperature, args.top_k, args.top_p))
        if args.num_samples > 1:
            print("-" * 40)


def cmd_eval(args: argparse.Namespace) -> None:
    """Perplexity and bits per byte on --data files, lm-eval tasks with --tasks, or both."""
    import json

    if not args.data and not args.tasks:
        raise HftrainError("hftrain eval needs --data FILE (perplexity, bits per byte) or "
                           "--tasks T1,T2 (lm-eval benchmarks), or both")
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if args.tasks is not None and not tasks:
        raise HftrainError("--tasks names no task: give lm-eval task names, e.g. --tasks "
                           "lambada_openai,hellaswag")
    if not tasks and (args.include_path or args.limit):
        raise HftrainError("--include-path and --limit apply to lm-eval tasks: add --tasks")
    if tasks:
        from hftrain.harness import require_lm_eval

        require_lm_eval()  # before --data spends any time
    result: dict[str, Any] = _eval_data(args) if args.data else {}
    if tasks:
        from hftrain.evaluation import recorded_block_size
        from hftrain.harness import format_results, run_tasks

        task_results = run_tasks(
            args.export, tasks, include_path=args.include_path, limit=args.limit,
            batch_size=args.batch_size,
            max_length=args.block_size or recorded_block_size(args.export),
            trust_remote_code=args.trust_remote_code)
        result["tasks"] = task_results
        if not args.json:
            print("\n".join(format_results(task_results)))
    if args.json:
        print(json.dumps(result))


def _lm_eval_limit(text: str) -> int | float:
    """--limit: a whole number of documents per task, or a fraction of them below 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not value > 0 or (value >= 1 and value != int(value)):  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1 or a fraction "
                                         f"between 0 and 1, got {text}")
    return value if value < 1 else int(value)


def _eval_data(args: argparse.Namespace) -> dict[str, Any]:
    """`hftrain eval --data`: score the files, print the line (unless --json), return the
    figures with the block size and stride they were scored with."""
    from accelerate import Accelerator

    from hftrain.data import texts
    from hftrain.evaluation import evaluate_texts, scoring_block_size
    from hftrain.generation import load_export
    from hftrain.recipe import DataConfig

    model, tokenizer = load_export(args.export, trust_remote_code=args.trust_remote_code)
    block_size = scoring_block_size(args.export, model, args.block_size)
    stride = args.stride or block_size
    if stride > block_size:
        raise HftrainError(f"--stride {stride} is more than the block size ({block_size}); "
                           "windows would skip tokens: use 1 <= --stride <= --block-size")
    source = DataConfig(train_files=args.data, val_fraction=0.0, text_column=args.text_column,
                        sample_by=args.sample_by)
    documents = _some_text(texts(source, "train", whole=True), ", ".join(args.data))
    accelerator = Accelerator()
    result = evaluate_texts(model.to(accelerator.device), tokenizer, documents, accelerator,
                            block_size, stride, args.batch_size)
    if result["bytes"] == 0:  # special tokens only: nothing the bits per byte could divide
        raise DataError(f"no text to score in {', '.join(args.data)}: it holds only special "
                        "tokens")
    if not args.json:
        print(f"{', '.join(args.data)}: loss {result['loss']:.4f} | perplexity "
              f"{result['perplexity']:.3f} | bits/byte {result['bits_per_byte']:.4f} | "
              f"{result['tokens']:,} tokens (block {block_size}, stride {stride})")
    return {**result, "block_size": block_size, "stride": stride}


def _some_text(documents: Iterable[str], source: str) -> Iterator[str]:
    """`documents`, checked to hold some text once they are all read (nothing to score is
    an error, not a perplexity)."""

    empty = True
    for text in documents:
        empty = empty and not text
        yield text
    if empty:
        raise DataError(f"no text to score in {source}")


def cmd_push(args: argparse.Namespace) -> None:
    from hftrain.hub import push

    export = Path(args.export)
    folder = Path(args.folder) if args.folder else export.parent / "hub"
    files = push(export, args.repo_id, folder, private=args.private, dry_run=args.dry_run)
    verb = "would upload" if args.dry_run else "uploaded"
    print(f"{verb} {len(files)} files from {folder} to https://huggingface.co/{args.repo_id}:")
    for name in files:
        print(f"  {name}")


def cmd_export(args: argparse.Namespace) -> None:
    from hftrain.gguf_export import client_hint, write_gguf

    out = write_gguf(Path(args.export), Path(args.gguf))
    print(f"wrote {out} ({out.stat().st_size / 1e6:,.1f} MB, float32); run it with: "
          f"{client_hint(Path(args.export), Path(shlex.quote(str(out))))}")


class _Parser(argparse.ArgumentParser):
    """argparse, with a mistake reported as one line like every other hftrain error (by
    default the usage block comes first and buries it; --help still shows the usage)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"hftrain: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _int_at_least(minimum: int) -> Any:
    """An argparse type: a whole number >= `minimum`."""

    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return whole_number


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None


def _temperature(text: str) -> float:
    import math

    value = _number(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0 = greedy), got {text}")
    return value


def _top_p(text: str) -> float:
    value = _number(text)
    if not 0 < value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be > 0 and <= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hftrain",
        description="Train language models on the Hugging Face stack from one YAML recipe.",
        epilog="example: hftrain train recipes/shakespeare/gpt2-char.yaml train.max_steps=100",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_text in (
        ("tokenizer", cmd_tokenizer, "build the recipe's tokenizer into <output_dir>/tokenizer"),
        ("prepare", cmd_prepare, "tokenize the recipe's data once into its data.cache folder"),
        ("train", cmd_train, "tokenizer -> data -> model -> train -> eval -> export -> sample"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("recipe", help="path to a YAML recipe")
        p.add_argument("overrides", nargs="*", help="dotted overrides: train.max_steps=100")
        p.set_defaults(func=func, resume=False)
        if name == "train":
            p.add_argument("--resume", action="store_true",
                           help="continue from the newest checkpoint (checkpoint.resume=auto)")
    e = sub.add_parser("eval", help="perplexity and bits per byte of an export on text files, "
                                     "and lm-eval benchmarks")
    e.add_argument("export", help="an export folder (run_dir/final) or Hub id")
    e.add_argument("--data", nargs="+", default=None,
                   help="text (.txt), JSON Lines or Parquet files; each document is scored alone")
    e.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval tasks (needs the extra: pip install "
                        "'hftrain[eval]'); --data, --tasks or both")
    e.add_argument("--include-path", default=None,
                   help="a folder of local lm-eval task YAMLs (for --tasks)")
    e.add_argument("--limit", type=_lm_eval_limit, default=None,
                   help="lm-eval: at most N documents per task (a fraction if below 1); "
                        "for quick checks, not for reporting")
    e.add_argument("--block-size", type=_int_at_least(1), default=None,
                   help="tokens of context per window (default: the training recipe's); "
                        "also lm-eval's max_length")
    e.add_argument("--stride", type=_int_at_least(1), default=None,
                   help="tokens between windows (default: block size, no overlap); smaller "
                        "strides give every token more context and cost more forward passes "
                        "(--data only: lm-eval's windows do not overlap)")
    e.add_argument("--batch-size", type=_int_at_least(1), default=16)
    e.add_argument("--text-column", default="text", help="column of JSON Lines/Parquet files")
    e.add_argument("--sample-by", choices=["document", "paragraph", "line"], default="document",
                   help="what one document of a .txt file is")
    e.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code shipped with the export (recurrent models) and "
                        "Python functions in local lm-eval task files (!function)")
    e.add_argument("--json", action="store_true",
                   help="print the result as one JSON object (--data figures, block_size, "
                        "stride; lm-eval metrics under \"tasks\")")
    e.set_defaults(func=cmd_eval)
    h = sub.add_parser("push", help="upload an export with a model card to the Hugging Face Hub")
    h.add_argument("export", help="an export folder (run_dir/final)")
    h.add_argument("--repo-id", required=True, help="user/name or org/name on the Hub")
    h.add_argument("--private", action="store_true", help="create the repository as private")
    h.add_argument("--dry-run", action="store_true",
                   help="write the folder that would be uploaded and list it; upload nothing")
    h.add_argument("--folder", default=None,
                   help="where to stage the upload (default: <run_dir>/hub)")
    h.set_defaults(func=cmd_push)
    x = sub.add_parser("export", help="write an export in another format: --gguf FILE for "
                                      "llama.cpp, Ollama, LM Studio")
    x.add_argument("export", help="an export folder (run_dir/final)")
    x.add_argument("--gguf", required=True, help="the GGUF file to write (float32)")
    x.set_defaults(func=cmd_export)
    g = sub.add_parser("generate", help="sample text from an exported model")
    g.add_argument("export", help="an export folder (run_dir/final) or Hub id")
    g.add_argument("--prompt", default="")
    g.add_argument("--max-new-tokens", type=_int_at_least(1), default=200)
    g.add_argument("--temperature", type=_temperature, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=_int_at_least(1), default=200,
                   help="sample from the k most likely tokens")
    g.add_argument("--top-p", type=_top_p, default=None,
                   help="sample from the most likely tokens that hold this much probability")
    g.add_argument("--num-samples", type=_int_at_least(1), default=1)
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code shipped with the export (recurrent models)")
    g.set_defaults(func=cmd_generate)
    return parser


def _another_process_of_this_node_says_it() -> bool:
    """Under torchrun every process reads the same recipe and finds the same mistake before
    the processes talk, and all stop together on a non-finite loss: the first process of
    each node prints it (once on one machine; on several, each node says it, in case a node
    lacks the file)."""
    return int(os.environ.get("LOCAL_RANK", "0")) != 0


def _wait_for_the_one_that_says_it() -> None:
    """torchrun stops every process of a launch as soon as one exits with an error: a silent
    process exiting first could stop the one that says the error before it has printed it.
    The silent ones wait for torchrun's SIGTERM (sent once the first has exited), at most
    30 s."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.sigtimedwait({signal.SIGTERM}, 30)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling `overrides` at the first option: `train R --resume a=1` leaves
    # `a=1` over. Overrides may come before or after options.
    if extra and hasattr(args, "overrides") and all("=" in e and e[0] != "-" for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _quiet_libraries()
    try:
        args.func(args)
    except ReportedByMainProcess:
        sys.exit(2)
    except HftrainError as exc:
        said_by_every_rank = isinstance(exc, (RecipeError, TrainingDiverged))
        if not (said_by_every_rank and _another_process_of_this_node_says_it()):
            print(f"hftrain: error: {exc}", file=sys.stderr)
        elif hasattr(signal, "sigtimedwait"):
            _wait_for_the_one_that_says_it()
        sys.exit(2)
    except KeyboardInterrupt:
        print("hftrain: interrupted", file=sys.stderr)
        sys.exit(130)
