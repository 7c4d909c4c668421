"""Supervised fine-tuning records -> token ids and labels that count only the answer.

Two record shapes are read (JSON Lines, Parquet or a Hub dataset):

- `{"prompt": str, "completion": str}`: the start token (`hftrain.framing`), the prompt, the
  completion and EOS, as plain text (TRL's "standard" format); only the completion and EOS
  are scored.
- `{"messages": [{"role": ..., "content": ...}, ...]}`: a conversation rendered with the
  tokenizer's chat template; only the assistant turns are scored.

The mask comes from rendering the conversation one message at a time: the text an assistant
message adds to the rendered prefix is scored, everything else is context. Each piece is
tokenized on its own, so no token straddles a scored/unscored boundary.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hftrain.errors import DataError, RecordError
from hftrain.framing import Framing, token_bytes

IGNORE_INDEX = -100

DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|turn|>{{ message['role'] }}\n{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|turn|>assistant\n{% endif %}"
)
"""Set on every tokenizer hftrain builds: a conversation opens with BOS, as every document
does, and each turn is `<|turn|>role\\ncontent<|endoftext|>`, so a fine-tuned model ends its
answer with EOS, which stops `generate`."""

SFT_COLUMNS = ("prompt", "completion", "messages")


def value_kind(value: Any) -> str:
    """What a JSON value is, for messages: "null", "a number", "a list", ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "an object"
    return "a list" if isinstance(value, (list, tuple)) else f"a {type(value).__name__}"


def record_problem(record: dict[str, Any]) -> str | None:
    """What is wrong with a fine-tuning record's shape, or None when it can be encoded.

    Both are unusable, but a raw JSON record (`hftrain.data_check`) tells an absent field from
    a null one; in a `datasets` row the fields a record lacks are already None."""
    messages = record.get("messages")
    if messages is not None:
        if not isinstance(messages, (list, tuple)):
            return f"'messages' is {value_kind(messages)}, not a list of {{role, content}} objects"
        for i, message in enumerate(messages, 1):
            if not isinstance(message, dict):
                return (f"message {i} of 'messages' is {value_kind(message)}, not a "
                        "{role, content} object")
            for key in ("role", "content"):
                if not isinstance(message.get(key), str):
                    return (f"'{key}' of message {i} of 'messages' is "
                            f"{value_kind(message.get(key))}, not a string")
        return None
    for key in ("prompt", "completion"):
        if not isinstance(record.get(key), str):
            what = f"no '{key}'" if key not in record else \
                f"'{key}' is {value_kind(record[key])}, not a string"
            return (f"{what} (a fine-tuning record needs string 'prompt' and 'completion' "
                    "fields, or a 'messages' list)")
    return None


def record_segments(record: dict[str, Any], tokenizer: Any,
                    scored_from: int = 0) -> list[tuple[str, bool]]:
    """The record's text as consecutive (text, scored) pieces; of a conversation, the
    assistant messages from the `scored_from`-th on are scored."""
    problem = record_problem(record)
    if problem:
        raise RecordError(f"a fine-tuning record is malformed: {problem}")
    if record.get("messages") is not None:
        return _conversation_segments(record["messages"], tokenizer, scored_from)
    return [(record["prompt"], False), (record["completion"] + tokenizer.eos_token, True)]


def _conversation_segments(messages: list[dict], tokenizer: Any,
                           scored_from: int) -> list[tuple[str, bool]]:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("'messages' records need a tokenizer with a chat template; this one "
                        "has none (set tokenizer.chat_template on it, or use prompt/completion)")
    segments: list[tuple[str, bool]] = []
    rendered = ""
    for i, message in enumerate(messages):
        is_answer = message.get("role") == "assistant" and i >= scored_from
        if is_answer:  # the generation prompt ("<|turn|>assistant\n") is context
            prefix = _render(tokenizer, messages[:i], add_generation_prompt=True)
            segments.append((_extension(rendered, prefix), False))
            rendered = prefix
        text = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        segments.append((_extension(rendered, text), is_answer))
        rendered = text
    return [(text, scored) for text, scored in segments if text]


def _render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _extension(before: str, after: str) -> str:
    if not after.startswith(before):
        raise DataError("the tokenizer's chat template does not render a conversation as an "
                        "extension of its first messages, so assistant turns cannot be masked")
    return after[len(before):]


def encode_record(record: dict[str, Any], tokenizer: Any, with_bytes: bool = False,
                  scored_from: int = 0) -> np.ndarray:
    """A (2, n) array: token ids, and labels (the id where scored, IGNORE_INDEX elsewhere).

    A prompt/completion record opens with the start token, as every document does
    (`hftrain.framing`; a chat template writes its own). `with_bytes` adds a third row: the
    UTF-8 bytes each scored token stands for (0 where not scored). `scored_from`: of a
    conversation, only assistant messages from that index on are scored (a preference
    pair's completion after its prompt, `hftrain.preference`)."""
    backend = tokenizer.backend_tokenizer
    framing = Framing.of(tokenizer)
    pieces = record_segments(record, tokenizer, scored_from)
    encode = backend.encode_batch if with_bytes else backend.encode_batch_fast
    encodings = encode([text for text, _ in pieces], add_special_tokens=False)
    opening = [] if record.get("messages") is not None else [framing.start]
    ids = [np.asarray(opening, dtype=np.int64)] + [np.asarray(e.ids, np.int64) for e in encodings]
    scored = [False] + [scored for _, scored in pieces]
    labels = [i if s else np.full_like(i, IGNORE_INDEX) for i, s in zip(ids, scored, strict=True)]
    rows = [np.concatenate(ids), np.concatenate(labels)]
    if with_bytes:
        counts = [token_bytes(framing, text, e, begins=False, ends=False) * s
                  for e, (text, s) in zip(encodings, pieces, strict=True)]
        rows.append(np.concatenate([np.zeros(len(opening), np.int64), *counts]))
    return np.stack(rows)
