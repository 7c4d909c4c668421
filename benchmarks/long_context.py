"""Long context: validation loss at several lengths, before and after a rope-scaling fine-tune.

    python benchmarks/long_context.py BASE LONG [--lengths 64 128 256]
        [--data recipes/data/tinyshakespeare.txt] [--val-fraction 0.1]

BASE is an export that learned at its `max_position_embeddings`; LONG is BASE fine-tuned with
`model.rope_scaling` and more positions (recipes/shakespeare/llama-char-yarn256.yaml). Rows:

- BASE as it is, at the lengths within its positions (`hftrain eval` refuses longer ones);
- BASE with plain rotary positions past its length (its config's positions raised, nothing
  else: what happens without scaling);
- BASE with LONG's rope scaling and no training (the scaling alone);
- LONG, fine-tuned.

Each is scored with hftrain's evaluation (`evaluate_texts`: non-overlapping windows of the
length, every token scored once) on the validation split the recipes hold out (the last
`--val-fraction` of the text), in the same process, so the rows compare directly.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import transformers
from accelerate import Accelerator
from transformers import AutoConfig, AutoModelForCausalLM

from hftrain.data import texts
from hftrain.evaluation import evaluate_texts
from hftrain.recipe import DataConfig
from hftrain.tokenizer import load_tokenizer


def variants(base: Path, long: Path) -> dict[str, tuple[AutoModelForCausalLM, int]]:
    """Each row's model and the longest length it is scored at."""
    config = AutoConfig.from_pretrained(base)
    learned = config.max_position_embeddings
    long_config = json.loads((long / "config.json").read_text())
    stretched = copy.deepcopy(config)
    stretched.max_position_embeddings = long_config["max_position_embeddings"]
    scaled = copy.deepcopy(stretched)
    scaled.rope_parameters = long_config["rope_parameters"]
    return {
        "base": (AutoModelForCausalLM.from_pretrained(base), learned),
        "base, plain positions past its length": (
            AutoModelForCausalLM.from_pretrained(base, config=stretched), 10**9),
        "base + scaling, untrained": (AutoModelForCausalLM.from_pretrained(base, config=scaled),
                                      10**9),
        "fine-tuned": (AutoModelForCausalLM.from_pretrained(long), 10**9),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("base")
    parser.add_argument("long")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--data", default="recipes/data/tinyshakespeare.txt")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    args = parser.parse_args()
    transformers.logging.disable_progress_bar()
    base, long = Path(args.base), Path(args.long)
    tokenizer = load_tokenizer(str(long))
    split = DataConfig(train_files=[args.data], val_fraction=args.val_fraction)
    text = list(texts(split, "val", whole=True))
    accelerator = Accelerator()
    torch.manual_seed(0)
    print(f"validation loss (nats/token) on {args.data}'s last {args.val_fraction:.0%}, "
          f"{sum(len(t) for t in text):,} characters")
    print(f"{'model':40s}" + "".join(f"{n:>10d}" for n in args.lengths))
    for name, (model, limit) in variants(base, long).items():
        model.eval()
        cells = []
        for length in args.lengths:
            if length > limit:
                cells.append(f"{'-':>10s}")
                continue
            result = evaluate_texts(model, tokenizer, text, accelerator, length, length, 8)
            cells.append(f"{result['loss']:10.4f}")
        print(f"{name:40s}" + "".join(cells))


if __name__ == "__main__":
    main()
