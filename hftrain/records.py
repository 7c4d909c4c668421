"""The record kinds of `data.kind` (all but `text`): the fields a reader keeps, the check of
a record's shape (a bad record is named by file and line before a run starts,
`hftrain.data_check`) and its encoding into rows of token ids (`hftrain.data.loader`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from hftrain.preference import PAIR_ROWS, PREFERENCE_COLUMNS, encode_pair, preference_problem
from hftrain.sft import SFT_COLUMNS, encode_record, record_problem


class RecordKind(NamedTuple):
    columns: tuple[str, ...]
    problem: Callable[[dict[str, Any]], str | None]
    """What is wrong with a record's shape, or None."""
    encode: Callable[[dict[str, Any], Any, bool], np.ndarray]
    """(record, tokenizer, with_bytes) -> rows of token ids, labels, ... (`rows`)."""
    rows: tuple[str, ...]
    """The rows `encode` returns without bytes (`packing.collate` names them)."""
    what: str


RECORD_KINDS = {
    "sft": RecordKind(SFT_COLUMNS, record_problem, encode_record, ("ids", "labels"),
                      "a fine-tuning record"),
    "preference": RecordKind(PREFERENCE_COLUMNS, preference_problem, encode_pair, PAIR_ROWS,
                             "a preference record"),
}
