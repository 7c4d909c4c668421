"""How documents sit in a token stream, and the text each token stands for.

Framing: every document is preceded by a *start* token and followed by EOS. The start token is
the tokenizer's BOS (EOS if it has none), because that is the token clients such as
lm-evaluation-harness put before a text they score: a model must have trained on the first
token of a document following it, or every such client scores that token out of distribution.
When BOS and EOS are one token (GPT-2's `<|endoftext|>`, and every tokenizer hftrain builds),
the EOS that ends a document also starts the next, so documents cost one token each and the
stream opens with one start token: `S d1 S d2 S`. With distinct tokens (Llama-style) each
document is `B d E`.

Bytes: bits per byte divides by the UTF-8 bytes of the text the scored tokens stand for. A
token stands for the text from the end of the previous token to its own end (so the space
before a word belongs to the word, and an unknown word to its `<unk>`), and the EOS that
ends a document for whatever follows its last token. The bytes of a document's tokens thus
sum to the document's UTF-8 length whatever the tokenizer: char, BPE and word tokenizers share
one denominator, as lm-eval's `bits_per_byte` (bytes of the text) assumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Framing:
    """The start and end tokens of documents for one tokenizer."""

    start: int
    end: int
    special: frozenset[int] = frozenset()
    """The tokenizer's special tokens but UNK: written in a text, they stand for no text
    (UNK stands for the unknown text it replaces, unless it is also a special token with a
    role of its own, as GPT-2's `<|endoftext|>` is)."""

    @classmethod
    def of(cls, tokenizer: Any) -> Framing:
        bos = tokenizer.bos_token_id
        eos, unk = tokenizer.eos_token_id, tokenizer.unk_token_id
        special = set(tokenizer.all_special_ids)
        if unk not in (bos, eos, tokenizer.pad_token_id):  # GPT-2's UNK is its <|endoftext|>
            special.discard(unk)
        return cls(start=eos if bos is None else bos, end=eos, special=frozenset(special))

    @property
    def shared(self) -> bool:
        """Start and end are one token, written once between documents."""
        return self.start == self.end

    @property
    def opening(self) -> list[int]:
        """What a stream of documents begins with (the first document's start token, when
        the start of every later one is the previous one's EOS)."""
        return [self.start] if self.shared else []

    @property
    def prefix(self) -> list[int]:
        """What each document begins with inside a stream."""
        return [] if self.shared else [self.start]

    def document(self, ids: list[int], begins: bool = True, ends: bool = True) -> list[int]:
        """A document's tokens in a stream (`begins`/`ends`: whether its start or end is
        in this part of it)."""
        return (self.prefix if begins else []) + ids + ([self.end] if ends else [])


def token_bytes(framing: Framing, text: str, encoding: Any, begins: bool = True,
                ends: bool = True) -> np.ndarray:
    """UTF-8 bytes each token of `framing.document(encoding.ids, begins, ends)` stands for
    (see the module docstring).

    `encoding` is the `tokenizers` Encoding of `text` (its character offsets are read). The
    start token, and special tokens written in the text, stand for nothing; text after the
    last token goes to the closing EOS, or (when the document goes on in the next part) to
    the last token.
    """
    offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
    if not text.isascii():  # character offsets -> byte offsets
        widths = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        widths = 1 + (widths >= 0x80) + (widths >= 0x800) + (widths >= 0x10000)
        byte_at = np.concatenate([[0], np.cumsum(widths, dtype=np.int64)])
        offsets, total = byte_at[offsets], int(byte_at[-1])
    else:
        total = len(text)
    ends_at = np.maximum.accumulate(offsets[:, 1]) if len(offsets) else offsets[:, 1]
    counts = np.diff(ends_at, prepend=0)
    if framing.special:  # its own characters are not text (the space before it still is)
        special = np.isin(encoding.ids, list(framing.special))
        counts[special] -= np.minimum(offsets[special, 1] - offsets[special, 0], counts[special])
    rest = total - (int(ends_at[-1]) if len(ends_at) else 0)
    head = np.zeros(len(framing.prefix) if begins else 0, dtype=np.int64)
    if ends:
        return np.concatenate([head, counts, [rest]]).astype(np.int64)
    if len(counts):
        counts[-1] += rest
    return np.concatenate([head, counts]).astype(np.int64)
