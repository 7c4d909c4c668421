"""Preference records -> a chosen and a rejected example side by side, each scoring only its
completion (`data.kind: preference`, trained with `train.objective: dpo`).

Three record shapes are read, TRL's preference formats:

- `{"prompt": str, "chosen": str, "rejected": str}`: each side is the fine-tuning example
  `{prompt, completion}` (`hftrain.sft`): start token, prompt, completion, EOS; the
  completion and EOS are scored.
- `{"prompt": [messages], "chosen": [messages], "rejected": [messages]}`: each side is the
  conversation prompt + completion rendered with the chat template; only the completion's
  assistant messages are scored (the prompt's own assistant turns are context).
- `{"chosen": [messages], "rejected": [messages]}` (an implicit prompt): the messages both
  sides share from the start are the prompt.

Both sides of a pair are encoded with the SFT masking, so a preference pair is scored exactly
as two fine-tuning examples would be.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hftrain.errors import RecordError
from hftrain.sft import IGNORE_INDEX, encode_record, record_problem, value_kind

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")

PAIR_ROWS = ("ids", "labels", "rejected_ids", "rejected_labels")
"""The rows of an encoded pair (`packing.collate` names them), then "bytes" of the chosen
side when asked for."""


def preference_problem(record: dict[str, Any]) -> str | None:
    """What is wrong with a preference record's shape, or None when it can be encoded."""
    sides = [record.get(key) for key in PREFERENCE_COLUMNS]
    if all(isinstance(side, str) for side in sides):
        return None if sides[1] != sides[2] else \
            "'chosen' and 'rejected' are the same text: the pair prefers nothing"
    if any(isinstance(side, str) for side in sides) or not all(
            isinstance(record.get(key), (list, tuple)) for key in ("chosen", "rejected")):
        shapes = ", ".join(f"'{key}' is "
                           f"{value_kind(record[key]) if key in record else 'absent'}"
                           for key in PREFERENCE_COLUMNS)
        return (f"{shapes} (a preference record needs string 'prompt', 'chosen' and "
                "'rejected' fields, or lists of {role, content} messages)")
    for key in PREFERENCE_COLUMNS:
        if record.get(key) is not None:
            problem = record_problem({"messages": record[key]})
            if problem:
                return problem.replace("'messages'", f"'{key}'")
    try:
        prompt, chosen, rejected = conversation_sides(record)
    except RecordError as exc:
        return str(exc)
    for key, completion in (("chosen", chosen), ("rejected", rejected)):
        if not any(message["role"] == "assistant" for message in completion):
            return f"the '{key}' completion has no assistant message to score"
    return None


def conversation_sides(record: dict[str, Any]) -> tuple[list, list, list]:
    """(prompt, chosen, rejected) messages; an implicit prompt is the messages both sides
    share from the start."""
    chosen, rejected = list(record["chosen"]), list(record["rejected"])
    if record.get("prompt") is not None:
        return list(record["prompt"]), chosen, rejected
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == len(chosen) or shared == len(rejected):
        raise RecordError("'chosen' and 'rejected' do not differ after the messages they "
                          "share (with no 'prompt', the shared messages are the prompt)")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def encode_pair(record: dict[str, Any], tokenizer: Any, with_bytes: bool = False) -> np.ndarray:
    """A (4, n) array of the rows `PAIR_ROWS` names, both sides padded with IGNORE_INDEX to
    the longer; `with_bytes` adds a fifth row, the bytes of the chosen side's scored tokens
    (its bits per byte, `hftrain.evaluation`)."""
    problem = preference_problem(record)
    if problem:
        raise RecordError(f"a preference record is malformed: {problem}")
    if isinstance(record.get("chosen"), str):
        sides = [{"prompt": record["prompt"], "completion": record[key]}
                 for key in ("chosen", "rejected")]
        chosen, rejected = (encode_record(side, tokenizer, with_bytes) for side in sides)
    else:
        prompt, *completions = conversation_sides(record)
        chosen, rejected = (encode_record({"messages": prompt + completion}, tokenizer,
                                          with_bytes, scored_from=len(prompt))
                            for completion in completions)
    width = max(chosen.shape[1], rejected.shape[1])
    pair = np.full((4 + with_bytes, width), IGNORE_INDEX, dtype=np.int64)
    pair[:2, : chosen.shape[1]] = chosen[:2]
    pair[2:4, : rejected.shape[1]] = rejected[:2]
    if with_bytes:
        pair[4] = 0
        pair[4, : chosen.shape[1]] = chosen[2]
    return pair
