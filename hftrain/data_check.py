"""Which file and line broke a data stream, and whether a data file changed during a run.

`datasets` streams rows without saying which file or line each came from, and what it raises
for bad data names neither: a UnicodeDecodeError with an offset into a 10 MB chunk, pyarrow's
ArrowInvalid with a row number inside one block of one file, a TypeError from a null text deep
in a `map`. Checking every file before training would read the whole corpus once more on every
run, so nothing is checked up front. Only when reading a stream fails does `explain` read the
local files again, in plain Python and in order, and report the first problem it finds with
its file and line (or record). Hub datasets cannot be scanned: their errors name the dataset.

A file that is rewritten, truncated or deleted while a run reads it would silently change what
the run trains and evaluates on (a truncated file just has fewer tokens), so `DataStreams`
takes each local file's `fingerprint` when it builds a stream and `check_unchanged` compares
them at every epoch end and every start of the validation stream: a few `stat` calls.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hftrain.errors import DataError, RecordError
from hftrain.records import RECORD_KINDS
from hftrain.sft import value_kind


@dataclass(frozen=True)
class Source:
    """Where a stream's rows come from: local files, which can be scanned, or a Hub dataset."""

    name: str
    """For messages: the files, or "dataset <id>"."""
    files: tuple[str, ...]
    """The local files in reading order; empty for a Hub dataset."""
    fmt: str
    """The `datasets` builder that reads the files: "text", "json", "parquet", ..."""
    kind: str
    """data.kind: "text" (one text column), or a kind of records (`RECORD_KINDS`)."""
    column: str
    """data.text_column, which text rows are read from."""


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().split("\n")[0] or type(exc).__name__


def _read_errors() -> tuple[type[BaseException], ...]:
    """What `datasets` and the libraries under it raise for a file they cannot read."""
    import pyarrow as pa
    from datasets.exceptions import DatasetsError

    return (OSError, ValueError, pa.ArrowException, DatasetsError)  # ValueError: json, UTF-8


def explain(exc: Exception, source: Source | None) -> DataError | None:
    """The DataError to raise for `exc`, met while reading the rows of `source`, or None when
    `exc` does not come from the data (a bug, whose traceback is kept)."""
    if source is None:  # a stream not built by `text_stream`: nothing to name
        return None
    try:
        problem = locate_problem(source) if source.files else None
    except OSError:  # a file that cannot be opened: the error below names it
        problem = None
    if problem:
        return DataError(problem)
    if isinstance(exc, RecordError):
        return DataError(f"{source.name}: {exc}")
    if isinstance(exc, _read_errors()):
        return DataError(f"cannot read {source.name} ({type(exc).__name__}): {_first_line(exc)}")
    return None


def locate_problem(source: Source) -> str | None:
    """The first problem in `source`'s files, as "<file> line <n>: <what>", or None."""
    scan = _SCANNERS.get(source.fmt)
    for path in source.files:
        if not os.path.isfile(path):
            return f"data file {path} was deleted during the run"
        problem = scan(path, source) if scan else None
        if problem:
            return problem
    return None


def _bad_utf8(path: str) -> str | None:
    """The line of the first byte that is not UTF-8, which is what `datasets` decodes text
    and JSON files as. Read in 1 MiB chunks: a binary file need not have line breaks."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                # exc.object is the chunk after the bytes of a character the last chunk split,
                # which hold no line break
                line += exc.object.count(b"\n", 0, exc.start)
                byte = exc.object[exc.start]
                what = f"byte 0x{byte:02x}" if chunk else "a character cut off at the end"
                return (f"{path} line {line}: not UTF-8 text ({what}); "
                        "save the file as UTF-8")
            if not chunk:
                return None
            line += chunk.count(b"\n")


def _scan_text(path: str, source: Source) -> str | None:
    return _bad_utf8(path)


def _text_problem(record: Any, source: Source) -> str | None:
    """What keeps a record (a JSON object, a Parquet row) from being trained on."""
    if not isinstance(record, dict):
        return f"the record is {value_kind(record)}, not a JSON object"
    if source.kind != "text":
        return RECORD_KINDS[source.kind].problem(record)
    if source.column not in record:
        return f"no '{source.column}' field (data.text_column)"
    value = record[source.column]
    if not isinstance(value, str):
        return f"'{source.column}' is {value_kind(value)}, not a string"
    return None


def _scan_json(path: str, source: Source) -> str | None:
    """JSON Lines, one object a line; or one JSON document holding a list of objects."""
    problem = _bad_utf8(path)
    if problem:
        return problem
    with open(path, encoding="utf-8") as f:
        first = True
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                if first:  # a JSON document spread over lines fails on its first line
                    document = _json_document(path)
                    if document is not None:
                        return _document_problem(path, document, source)
                return (f"{path} line {line_no}: not valid JSON ({exc.msg} at column "
                        f"{exc.colno}); a JSON Lines file holds one JSON object per line")
            first = False
            problem = _text_problem(record, source)
            if problem:
                return f"{path} line {line_no}: {problem}"
    return None


def _json_document(path: str) -> Any:
    """The file parsed as one JSON document, or None when it is not one."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError:
            return None


def _document_problem(path: str, document: Any, source: Source) -> str | None:
    records = document if isinstance(document, list) else [document]
    for i, record in enumerate(records, 1):
        problem = _text_problem(record, source)
        if problem:
            return f"{path} record {i}: {problem}"
    return None


def _scan_parquet(path: str, source: Source) -> str | None:
    """The schema first (a text column of numbers), then the rows (nulls, bad records)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        return f"{path}: not a readable Parquet file ({_first_line(exc)})"
    schema = parquet.schema_arrow
    wanted = [source.column] if source.kind == "text" else RECORD_KINDS[source.kind].columns
    columns = [c for c in wanted if c in schema.names]
    if not columns:
        return f"{path}: no column {' or '.join(map(repr, wanted))} (columns: {schema.names})"
    strings = (pa.types.is_string, pa.types.is_large_string,
               getattr(pa.types, "is_string_view", pa.types.is_string))
    for name in columns:
        kind = schema.field(name).type
        if source.kind == "preference":  # strings or message lists: checked row by row
            continue
        if name == "messages":
            if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
                return (f"{path}: column 'messages' holds {kind}, not lists of "
                        "{role, content} objects")
        elif not any(is_string(kind) for is_string in strings):
            hint = "; set data.text_column to a column of text" if source.kind == "text" else ""
            return f"{path}: column '{name}' holds {kind}, not strings{hint}"
    row = 0
    for batch in parquet.iter_batches(columns=columns):
        for record in batch.to_pylist():
            row += 1
            problem = _text_problem(record, source)
            if problem:
                return f"{path} record {row}: {problem}"
    return None


_SCANNERS: dict[str, Callable[[str, Source], str | None]] = {
    "text": _scan_text, "json": _scan_json, "parquet": _scan_parquet,
}


def fingerprint(path: str) -> tuple[int, int]:
    """A file's size and modification time: what changes when it is rewritten or truncated."""
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


SAMPLE_BYTES = 1 << 16


def content_sample(path: str) -> str:
    """A file told by its content, cheaply: its size and the SHA-256 of its first and last
    64 KiB. What a resume compares to recognise a data file moved to another path with the
    same bytes (a full hash would read the whole corpus at every start)."""
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(SAMPLE_BYTES))
        if size > SAMPLE_BYTES:
            f.seek(max(size - SAMPLE_BYTES, SAMPLE_BYTES))
            digest.update(f.read(SAMPLE_BYTES))
    return f"{size}:{digest.hexdigest()}"


def check_unchanged(fingerprints: dict[str, tuple[int, int]]) -> None:
    """Raise a DataError naming the first file that is gone or differs from its fingerprint."""
    for path, (size, mtime_ns) in fingerprints.items():
        try:
            now = fingerprint(path)
        except FileNotFoundError:
            raise DataError(f"data file {path} was deleted during the run; stopped rather than "
                            "go on without it") from None
        except OSError as exc:
            raise DataError(f"cannot read data file {path}: {_first_line(exc)}") from None
        how = describe_change((size, mtime_ns), now)
        if how:
            raise DataError(f"data file {path} changed during the run ({how}); stopped rather "
                            "than train or evaluate on different data")


def describe_change(then: tuple[int, int], now: tuple[int, int]) -> str | None:
    """How a file's (size, mtime) `fingerprint` changed, or None if it did not."""
    if tuple(now) == tuple(then):
        return None
    if now[0] != then[0]:
        return f"size {then[0]} -> {now[0]} bytes"
    return f"rewritten at the same size, {then[0]} bytes"
