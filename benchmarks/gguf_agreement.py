"""Does llama.cpp run hftrain's GGUF as hftrain runs the export? Tokens, log-likelihood and
greedy text, side by side.

    pip install llama-cpp-python==0.3.36        # builds llama.cpp from source (minutes)
    python benchmarks/gguf_agreement.py EXPORT [EXPORT ...] [--chars 4000] [--new-tokens 32]

For each export folder (GPT-2, Llama or Qwen3 with a byte-level BPE): `hftrain export --gguf`
writes a float32 GGUF, which llama.cpp (through llama-cpp-python) loads with the context the
model was trained at. Then, on the last `--chars` characters of Tiny Shakespeare:

1. tokens: llama.cpp's `tokenize` (no BOS, specials not parsed) against hftrain's tokenizer;
2. total NLL: the text framed as hftrain frames a document (start token, text, EOS), cut into
   the windows `hftrain eval --data` scores (`evaluation.text_windows`, stride = block size);
   each window evaluated by llama.cpp from an empty cache and scored from its logits, against
   `hftrain eval` on the export (its `nll`, in the same process: `evaluate_texts`);
3. greedy continuation of `--prompt` for `--new-tokens` tokens: llama.cpp sampling with
   top_k 1 against `hftrain generate --temperature 0` (`generation.generate_text`).

Target (issue 24): NLL within 0.1%, the same tokens and the same greedy text.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO / "recipes/data/tinyshakespeare.txt"


def llama_nll(llm, windows) -> float:
    """Summed NLL of the scored targets of each window, each evaluated from an empty cache."""
    total = 0.0
    for window in windows:
        ids, labels = window[0], window[1]
        n = int((ids != -100).sum())
        llm.reset()
        llm.eval([int(i) for i in ids[: n - 1]])
        logits = np.asarray(llm.scores[: n - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        for position in range(n - 1):
            target = int(labels[position + 1])
            if target != -100:
                total -= log_probs[position, target]
    return total


def compare(export: Path, work: Path, text: str, prompt: str, new_tokens: int) -> dict:
    from accelerate import Accelerator
    from llama_cpp import Llama

    from hftrain.evaluation import evaluate_texts, export_block_size, text_windows
    from hftrain.framing import Framing
    from hftrain.generation import generate_text, load_export
    from hftrain.gguf_export import write_gguf

    out = write_gguf(export, work / f"{export.parent.name}.gguf")
    model, tokenizer = load_export(str(export))
    model.eval()
    block = export_block_size(str(export), model)
    llm = Llama(model_path=str(out), n_ctx=0, logits_all=True, verbose=False, seed=0)

    hf_ids = tokenizer(text, add_special_tokens=False).input_ids
    cpp_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    framing = Framing.of(tokenizer)
    framed = np.array([[framing.start, *hf_ids, tokenizer.eos_token_id],
                       [0] * (len(hf_ids) + 2)])
    hftrain = evaluate_texts(model, tokenizer, [text], Accelerator(), block, block, 16)
    cpp = llama_nll(llm, list(text_windows(framed, block, block)))

    with torch.no_grad():
        greedy = generate_text(model, tokenizer, prompt, new_tokens, temperature=0.0)
    prompt_ids = [framing.start, *tokenizer(prompt, add_special_tokens=False).input_ids]
    generated = []
    for token in llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True):
        if token == tokenizer.eos_token_id or len(generated) == new_tokens:
            break
        generated.append(token)
    special = framing.special
    cpp_text = tokenizer.decode([i for i in prompt_ids[1:] + generated if i not in special])
    return {"export": str(export), "arch": model.config.model_type, "block": block,
            "tokens_equal": hf_ids == cpp_ids, "n_tokens": len(hf_ids),
            "nll_hftrain": hftrain["nll"], "nll_llama_cpp": cpp,
            "relative": cpp / hftrain["nll"] - 1, "greedy_equal": greedy == cpp_text,
            "greedy_hftrain": greedy, "greedy_llama_cpp": cpp_text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exports", nargs="+", type=Path)
    parser.add_argument("--chars", type=int, default=4000)
    parser.add_argument("--prompt", default="ROMEO:")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    text = TEXT.read_text(encoding="utf-8")[-args.chars:]
    failed = False
    with tempfile.TemporaryDirectory() as work:
        for export in args.exports:
            row = compare(export, Path(work), text, args.prompt, args.new_tokens)
            ok = row["tokens_equal"] and abs(row["relative"]) < 1e-3 and row["greedy_equal"]
            failed |= not ok
            print(f"{row['arch']:6s} {row['export']}: {row['n_tokens']:,} tokens "
                  f"{'equal' if row['tokens_equal'] else 'DIFFER'}; NLL hftrain "
                  f"{row['nll_hftrain']:.4f}, llama.cpp {row['nll_llama_cpp']:.4f} "
                  f"(relative {row['relative']:+.2e}); greedy {new(row)}")
    sys.exit(1 if failed else 0)


def new(row: dict) -> str:
    if row["greedy_equal"]:
        return f"equal ({row['greedy_hftrain'][:60]!r}...)"
    return (f"DIFFER:\n  hftrain:   {row['greedy_hftrain']!r}\n"
            f"  llama.cpp: {row['greedy_llama_cpp']!r}")


if __name__ == "__main__":
    main()
