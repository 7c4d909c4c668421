"""Command line: `hftrain {tokenizer,train,eval,generate,push} ...`.

Mistakes in the user's input (recipe keys, paths, data) end with one line on stderr and exit
status 2; tracebacks are kept for bugs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from hftrain.errors import HftrainError


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
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def cmd_tokenizer(args: argparse.Namespace) -> None:
    from hftrain.recipe import load_recipe
    from hftrain.tokenizer import save_tokenizer
    from hftrain.train import prepare_tokenizer

    recipe = load_recipe(args.recipe, args.overrides)
    tokenizer, built = prepare_tokenizer(recipe)
    folder = Path(recipe.run.output_dir) / "tokenizer"
    if built:
        folder.parent.mkdir(parents=True, exist_ok=True)
        save_tokenizer(tokenizer, folder)
        print(f"built a {recipe.tokenizer.kind} tokenizer of {len(tokenizer)} tokens: {folder}")
    else:
        print(f"tokenizer already present ({len(tokenizer)} tokens); nothing to build")


def cmd_train(args: argparse.Namespace) -> None:
    from accelerate import PartialState

    from hftrain.recipe import load_recipe
    from hftrain.train import train

    overrides = [*args.overrides, *(["checkpoint.resume=auto"] if args.resume else [])]
    recipe = load_recipe(args.recipe, overrides)
    result = train(recipe)
    if result.interrupted:
        if PartialState().is_main_process:
            print(f"hftrain: stopped at step {result.step}; checkpoint saved to "
                  f"{result.checkpoint}. Continue with: hftrain train {args.recipe} --resume",
                  file=sys.stderr)
        sys.exit(128 + result.interrupted)
    if PartialState().is_main_process:
        val = result.val
        print(f"validation: loss {val['loss']:.4f} | perplexity {val['perplexity']:.3f} | "
              f"bits/byte {val['bits_per_byte']:.4f} | {val['tokens']:,} tokens")
        print(f"trained {recipe.train.max_steps} steps in {result.train_seconds:.1f} s; "
              f"model exported to {result.final_dir}")
        print(f"sample:\n{result.sample}")


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
    from accelerate import Accelerator

    from hftrain.data import text_stream, texts
    from hftrain.evaluation import evaluate_texts, export_block_size
    from hftrain.generation import load_export
    from hftrain.recipe import DataConfig

    model, tokenizer = load_export(args.export, trust_remote_code=args.trust_remote_code)
    block_size = args.block_size or export_block_size(args.export, model)
    stride = args.stride or block_size
    source = DataConfig(train_files=args.data, val_fraction=0.0, text_column=args.text_column,
                        sample_by=args.sample_by)
    accelerator = Accelerator()
    result = evaluate_texts(model.to(accelerator.device), tokenizer,
                            texts(text_stream(source, "train")), accelerator, block_size,
                            stride, args.batch_size)
    print(f"{', '.join(args.data)}: loss {result['loss']:.4f} | perplexity "
          f"{result['perplexity']:.3f} | bits/byte {result['bits_per_byte']:.4f} | "
          f"{result['tokens']:,} tokens (block {block_size}, stride {stride})")


def cmd_push(args: argparse.Namespace) -> None:
    from hftrain.hub import push

    export = Path(args.export)
    folder = Path(args.folder) if args.folder else export.parent / "hub"
    files = push(export, args.repo_id, folder, private=args.private, dry_run=args.dry_run)
    verb = "would upload" if args.dry_run else "uploaded"
    print(f"{verb} {len(files)} files from {folder} to https://huggingface.co/{args.repo_id}:")
    for name in files:
        print(f"  {name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hftrain",
        description="Train language models on the Hugging Face stack from one YAML recipe.",
        epilog="example: hftrain train recipes/shakespeare/gpt2-char.yaml train.max_steps=100",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_text in (
        ("tokenizer", cmd_tokenizer, "build the recipe's tokenizer into <output_dir>/tokenizer"),
        ("train", cmd_train, "tokenizer -> data -> model -> train -> eval -> export -> sample"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("recipe", help="path to a YAML recipe")
        p.add_argument("overrides", nargs="*", help="dotted overrides: train.max_steps=100")
        p.set_defaults(func=func, resume=False)
        if name == "train":
            p.add_argument("--resume", action="store_true",
                           help="continue from the newest checkpoint (checkpoint.resume=auto)")
    e = sub.add_parser("eval", help="perplexity and bits per byte of an export on text files")
    e.add_argument("export", help="an export folder (run_dir/final) or Hub id")
    e.add_argument("--data", nargs="+", required=True,
                   help="text (.txt), JSON Lines or Parquet files; each document is scored alone")
    e.add_argument("--block-size", type=int, default=None,
                   help="tokens of context per window (default: the training recipe's)")
    e.add_argument("--stride", type=int, default=None,
                   help="tokens between windows (default: block size, no overlap); smaller "
                        "strides give every token more context and cost more forward passes")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--text-column", default="text", help="column of JSON Lines/Parquet files")
    e.add_argument("--sample-by", choices=["document", "paragraph", "line"], default="document",
                   help="what one document of a .txt file is")
    e.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code shipped with the export (recurrent models)")
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
    g = sub.add_parser("generate", help="sample text from an exported model")
    g.add_argument("export", help="an export folder (run_dir/final) or Hub id")
    g.add_argument("--prompt", default="")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=200)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code shipped with the export (recurrent models)")
    g.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        args.func(args)
    except HftrainError as exc:
        print(f"hftrain: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("hftrain: interrupted", file=sys.stderr)
        sys.exit(130)
