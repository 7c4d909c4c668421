"""Corpus perplexity and bits per byte from summed token negative log-likelihoods.

The Hub's `perplexity` metric reloads a model by id and averages per-text perplexities, which
weights a 3-token text like a 3,000-token one. A language model's perplexity is a property of
the corpus: exp(total NLL / total scored tokens). This module receives, per batch (and per
process, already reduced), the summed NLL in nats, the number of scored tokens and the number of
UTF-8 bytes of text those tokens stand for (whitespace and unknown words included: the same
text gives the same byte count whatever the tokenizer), and returns:

- loss: mean NLL per token (nats)
- perplexity: exp(loss)
- bits_per_byte: total NLL in bits / bytes of text, comparable across tokenizers (the formula
  of lm-evaluation-harness's `bits_per_byte`)
- nll, tokens, bytes: the sums themselves
"""

import math

import datasets
import evaluate

_KWARGS_DESCRIPTION = """
Args:
    nll_sum: summed negative log-likelihood (natural log) of the scored tokens of each batch.
    token_count: number of scored tokens of each batch (padding and ignored labels excluded).
    byte_count: UTF-8 bytes of text those tokens stand for.
Returns:
    loss, perplexity, bits_per_byte, nll, tokens, bytes.
"""


class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "nll_sum": datasets.Value("float64"),
                    "token_count": datasets.Value("int64"),
                    "byte_count": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, nll_sum, token_count, byte_count):
        tokens = sum(token_count)
        if tokens == 0:
            raise ValueError("no scored tokens: every label was ignored")
        nll = math.fsum(nll_sum)
        loss = nll / tokens
        n_bytes = sum(byte_count)
        return {
            "loss": loss,
            "perplexity": math.exp(loss),
            "bits_per_byte": nll / (math.log(2) * n_bytes) if n_bytes else float("nan"),
            "nll": nll,
            "tokens": tokens,
            "bytes": n_bytes,
        }
