"""Recurrent LMs against plain PyTorch: training throughput, generation cost, PTB quality.

    python benchmarks/recurrent.py throughput [--recipe R]   # tokens/s, paired steps
    python benchmarks/recurrent.py generation [--recipe R]   # s/token at 64 vs 1024 context
    python benchmarks/recurrent.py quality [--epochs 10]     # PTB test perplexity, same budget

The plain-PyTorch side is the classic `word_language_model` example of the PyTorch examples
repository: its RNNModel (seq-first nn.LSTM between a tied embedding and decoder, one dropout
on embeddings, between layers and on outputs) and its training loop (repackage the hidden
state, mean cross-entropy, clip 0.25, manual SGD update, lr divided by 4 when validation stops
improving). It reads the same token ids as hftrain, so only the model and loop code differ.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from timing import HftrainSteps, paired_steps, report
from torch import nn

from hftrain.data import DataStreams, texts
from hftrain.models import build_model
from hftrain.recipe import Recipe, load_recipe
from hftrain.run_tokenizer import prepare_tokenizer
from hftrain.train import train


class ClassicRNNModel(nn.Module):
    """The classic example's model: encoder -> dropout -> RNN -> dropout -> tied decoder."""

    def __init__(self, ntoken: int, ninp: int, nhid: int, nlayers: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        self.decoder.weight = self.encoder.weight
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, x: torch.Tensor, hidden):  # x: (T, B)
        output, hidden = self.rnn(self.drop(self.encoder(x)), hidden)  # (T, B, H)
        return self.decoder(self.drop(output)), hidden  # (T, B, V)


def batchify(tokens: np.ndarray, lanes: int) -> torch.Tensor:
    """The classic example's batchify: (T, lanes), dropping what does not divide."""
    n = len(tokens) // lanes
    return torch.from_numpy(tokens[: n * lanes]).view(lanes, n).t().contiguous()


def token_array(recipe: Recipe, tokenizer, split: str) -> np.ndarray:
    eos = tokenizer.eos_token_id
    ids = tokenizer.backend_tokenizer.encode_batch(list(texts(recipe.data, split, whole=True)),
                                                   add_special_tokens=False)
    return np.concatenate([np.asarray([*e.ids, eos], dtype=np.int64) for e in ids])


def classic_train_epoch(model, data, bptt, lr, clip, ntokens):
    model.train()
    hidden = None
    for i in range(0, data.size(0) - 1, bptt):
        seq_len = min(bptt, len(data) - 1 - i)
        x, y = data[i : i + seq_len], data[i + 1 : i + 1 + seq_len]
        hidden = None if hidden is None else tuple(h.detach() for h in hidden)
        model.zero_grad()
        output, hidden = model(x, hidden)
        loss = F.cross_entropy(output.view(-1, ntokens), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)


@torch.no_grad()
def classic_evaluate(model, data, bptt, ntokens) -> float:
    model.eval()
    total, count, hidden = 0.0, 0, None
    for i in range(0, data.size(0) - 1, bptt):
        seq_len = min(bptt, len(data) - 1 - i)
        output, hidden = model(data[i : i + seq_len], hidden)
        total += F.cross_entropy(output.view(-1, ntokens), data[i + 1 : i + 1 + seq_len]
                                 .reshape(-1), reduction="sum").item()
        count += seq_len * data.size(1)
    return total / count


def setup(recipe_path: str, overrides: list[str]):
    recipe = load_recipe(recipe_path, ["run.output_dir=/tmp/hftrain-bench-rnn", *overrides])
    torch.manual_seed(recipe.run.seed)
    tokenizer, _ = prepare_tokenizer(recipe)
    return recipe, tokenizer


def throughput(args) -> None:
    recipe, tokenizer = setup(args.recipe, [])
    streams = DataStreams(recipe.data, tokenizer, recipe.run.seed, stateful=True)
    batch_iter = streams.train_batches(recipe.train.batch_size)
    batches = [next(batch_iter) for _ in range(args.batches)]
    model = build_model(recipe.model, tokenizer, recipe.data.block_size)
    loop = HftrainSteps(recipe, model)
    fields, ntokens = recipe.model, len(tokenizer)
    plain = ClassicRNNModel(ntokens, fields.embedding_size, fields.hidden_size,
                            fields.num_layers, fields.dropout).train()
    plain_data = [(b["input_ids"].t().contiguous(), b["labels"].t().contiguous()) for b in batches]

    hftrain_batches, plain_batches = itertools.cycle(batches), itertools.cycle(plain_data)
    plain_state = None

    def hftrain_step():
        loop.optimizer_step([next(hftrain_batches)])

    def plain_step():
        nonlocal plain_state
        x, y = next(plain_batches)
        hidden = None if plain_state is None else tuple(h.detach() for h in plain_state)
        plain.zero_grad()
        output, plain_state = plain(x, hidden)
        F.cross_entropy(output.view(-1, ntokens), y.reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), recipe.train.grad_clip)
        for p in plain.parameters():
            p.data.add_(p.grad, alpha=-recipe.train.lr)

    rates = paired_steps({"hftrain": hftrain_step, "plain": plain_step}, args.steps,
                         args.warmup, batches[0]["input_ids"].numel())
    report(rates, f"{args.recipe} | {args.steps} paired steps after {args.warmup} warm-up")


def generation(args) -> None:
    recipe, tokenizer = setup(args.recipe, [])
    model = build_model(recipe.model, tokenizer, recipe.data.block_size).eval()
    new_tokens = 256

    def seconds(context: int, n_new: int) -> float:
        prompt = torch.randint(4, len(tokenizer), (1, context))
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id)
        return time.perf_counter() - start

    seconds(64, 8)  # warm-up
    per_token = {}
    for context in (64, 1024):
        runs = [(seconds(context, new_tokens + 1) - seconds(context, 1)) / new_tokens
                for _ in range(args.rounds)]
        per_token[context] = statistics.median(runs)
        print(f"context {context:5d}: {per_token[context] * 1e3:.3f} ms per new token "
              f"(median of {args.rounds}; prefill excluded)")
    print(f"ratio 1024/64: {per_token[1024] / per_token[64]:.3f}")


def quality(args) -> None:
    recipe, tokenizer = setup(args.recipe, [])
    train_tokens, test_tokens = token_array(recipe, tokenizer, "train"), \
        token_array(recipe, tokenizer, "val")
    lanes, bptt, ntokens = recipe.train.batch_size, recipe.data.block_size, len(tokenizer)
    windows = math.ceil((len(train_tokens) // lanes - 1) / bptt)
    print(f"training tokens {len(train_tokens):,}, test tokens {len(test_tokens):,}, "
          f"vocab {ntokens}, {windows} windows per epoch, {args.epochs} epochs")

    torch.manual_seed(recipe.run.seed)
    fields = recipe.model
    model = ClassicRNNModel(ntokens, fields.embedding_size, fields.hidden_size,
                            fields.num_layers, fields.dropout)
    train_data = batchify(train_tokens, lanes)
    test_data = batchify(test_tokens, recipe.eval.batch_size)
    lr, best, start = recipe.train.lr, math.inf, time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        classic_train_epoch(model, train_data, bptt, lr, recipe.train.grad_clip, ntokens)
        val = classic_evaluate(model, test_data, bptt, ntokens)
        print(f"  classic epoch {epoch:2d}: lr {lr:6.3f} test ppl {math.exp(val):8.2f}")
        if val < best:
            best = val
        else:
            lr /= 4.0
    classic_seconds = time.perf_counter() - start

    recipe_overrides = [f"train.max_steps={args.epochs * windows}", f"eval.interval={windows}",
                        "run.output_dir=/tmp/hftrain-bench-ptb", "run.overwrite=true"]
    hf_recipe = load_recipe(args.recipe, recipe_overrides)
    start = time.perf_counter()
    result = train(hf_recipe)
    hftrain_seconds = time.perf_counter() - start
    print(f"classic reference : test ppl {math.exp(best):8.2f} (best epoch)  "
          f"final {math.exp(val):8.2f}   {classic_seconds:6.1f} s")
    print(f"hftrain recipe    : test ppl {result.val['perplexity']:8.2f} (final)"
          f"{'':22s}{hftrain_seconds:6.1f} s (incl. tokenizer, evals, export)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("part", choices=["throughput", "generation", "quality"])
    parser.add_argument("--recipe", default="recipes/ptb/lstm-word.yaml")
    parser.add_argument("--rounds", type=int, default=6, help="generation: timed runs")
    parser.add_argument("--steps", type=int, default=400, help="throughput: timed steps per side")
    parser.add_argument("--warmup", type=int, default=20, help="throughput: untimed steps")
    parser.add_argument("--batches", type=int, default=40, help="throughput: batches cycled")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    {"throughput": throughput, "generation": generation, "quality": quality}[args.part](args)


if __name__ == "__main__":
    main()
