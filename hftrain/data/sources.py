"""Where documents come from: data files cut into *pieces*, and the documents of one piece.

A piece is a unit of work small enough to tokenize in one go (about `PIECE_BYTES` of a text
or JSON Lines file, cut at a line break; one row group of a Parquet file; one shard of a Hub
dataset). Pieces are what the ranks and the loader's workers divide among themselves, and
what the training stream's position counts, so that:

- a 200 MB one-document .txt is read 1 MiB at a time (memory does not grow with the file);
- N processes each read and tokenize about 1/N of the corpus, however many files it has;
- a resumed run re-reads nothing before its position.

Why not `datasets`' streaming builders for local files: the text builder reads a document
(`sample_by: document`) whole (6.4 GB RSS for a 52 MB file), one file is one shard (so it
cannot be split among ranks or workers), and `IterableDataset.state_dict()` does not restore
the shuffle buffer. Hub datasets still stream through `datasets`, one shard per piece.

The documents a piece yields are exactly what `datasets` would have read: text is decoded as
UTF-8 with universal newlines; `line` keeps empty lines; `paragraph` splits on blank lines.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hftrain.data_check import Source, check_unchanged, explain, fingerprint
from hftrain.errors import DataError, RecordError, one_line
from hftrain.recipe import DataConfig, expand_globs
from hftrain.records import RECORD_KINDS
from hftrain.sft import value_kind

PIECE_BYTES = 1 << 20
"""Target size of a piece of a text or JSON Lines file."""

CUTS = {
    "line": re.compile(rb"\n"),
    "paragraph": re.compile(rb"\n\r?\n"),
    # One document in several pieces, each tokenized on its own: cut only where the whole
    # text's tokens split anyway. A line break followed by at most one space and then a
    # non-space is its own pre-token for GPT-2's byte-level regex (after two spaces it would
    # join them), for the word tokenizer and for characters.
    "document": re.compile(rb"\n(?=[^\s]| [^\s])"),
}
"""Where a piece may start: after a line, a blank line, or a safe line break."""

LONG_LINE = 1 << 20
"""A stretch without a line break this long is cut inside (`INSIDE_LINE`): no piece holds
more than `PIECE_BYTES + LONG_LINE` bytes, however a file is laid out."""

INSIDE_LINE = re.compile(rb"(?<=\S) (?=\S)")
"""Where a piece may start when no line break comes for `LONG_LINE` bytes (a file of one long
line): at a single space between two non-spaces, which begins a pre-token for GPT-2's
byte-level regex (and Llama 3's, which joins the space to the word after it), ends one for
the word tokenizer, and splits characters; the tokens are those of the whole line. Only a
stretch with no such space either is cut at a character boundary, where a BPE merge across
the cut is lost (one per piece, against reading the whole file as one piece)."""

_FORMAT_BY_SUFFIX = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json",
                     ".parquet": "parquet"}


@dataclass(frozen=True)
class Piece:
    """A part of a split: bytes [start, end) of a file, a Parquet row group, a Hub shard."""

    path: str
    """The file, or the Hub dataset id."""
    fmt: str
    """"text", "json" (JSON Lines), "json_document" (one JSON list), "parquet" or "hub"."""
    start: int
    end: int
    """Byte range of a text/JSON Lines file; for Parquet the row group (start == end); for a
    Hub dataset the shard index (start) and how many pieces share the shard (end)."""
    ends_document: bool = True
    """`sample_by: document`: whether the piece holds the end of its file's document, which
    is followed by EOS. A document read in several pieces continues from piece to piece."""
    starts_document: bool = True
    """Likewise, whether the piece holds the start of its document (which the start token
    precedes, `hftrain.framing`)."""
    first_record: int = 0
    """Index of the piece's first record in the split (fine-tuning hold-out); for a Hub
    piece, which of the `end` pieces sharing its shard it is."""


def resolve_files(patterns: list[str], key: str) -> list[str]:
    """Expand globs and check every file exists; the error names the missing path."""
    files: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = expand_globs([pattern])
            if not matches:
                raise DataError(f"no file matches {key} pattern '{pattern}'")
            files.extend(matches)
        elif not Path(pattern).exists():
            raise DataError(f"data file not found: {pattern} (from {key})")
        elif not Path(pattern).is_file():
            raise DataError(f"data file {pattern} (from {key}) is not a regular file (a "
                            "folder, a pipe or a device); name the files, or a glob like "
                            "dir/*.txt")
        else:
            files.append(pattern)
    return files


def file_format(files: list[str], configured: str) -> str:
    if configured != "auto":
        return configured
    formats = {_FORMAT_BY_SUFFIX.get(Path(f).suffix.lower()) for f in files}
    if len(formats) != 1 or None in formats:
        raise DataError(f"cannot tell the format of {files} from their extensions; "
                        "set data.format")
    return formats.pop()


def split_files(config: DataConfig, split: str) -> tuple[list[str], bool]:
    """The local files a split reads, and whether it is held out of the training files."""
    if not config.train_files:
        raise DataError("the recipe names no training data: set data.train_files")
    if split == "val" and config.val_files:
        return resolve_files(config.val_files, "data.val_files"), False
    files = resolve_files(config.train_files, "data.train_files")
    held_out = not config.val_files and config.val_fraction > 0
    if split == "val" and not held_out:
        raise DataError("no validation data: set data.val_files or data.val_fraction > 0")
    return files, held_out


def split_source(config: DataConfig, split: str) -> Source:
    """Where a split reads from, for messages and for `data_check.explain`."""
    if config.dataset:
        return Source(f"dataset {config.dataset}", (), "", config.kind, config.text_column)
    files, _ = split_files(config, split)
    return Source(", ".join(files), tuple(files), file_format(files, config.format),
                  config.kind, config.text_column)


class SplitPieces:
    """The pieces of one split ("train" or "val"), in reading order, and how to read them."""

    def __init__(self, config: DataConfig, split: str, min_pieces: int = 1) -> None:
        self.config, self.split = config, split
        self.source = split_source(config, split)
        self.fingerprints: dict[str, tuple[int, int]] = {}
        self.held_out = False
        if config.dataset:
            self.held_out = config.val_split is None
            if split == "val" and self.held_out and config.val_fraction == 0:
                raise DataError("no validation data: set data.val_split or "
                                "data.val_fraction > 0")
            self.pieces = _hub_pieces(config, split, min_pieces)
        else:
            files, self.held_out = split_files(config, split)
            self.fingerprints = {path: fingerprint(path) for path in files}
            self.pieces = self._file_pieces(files, min_pieces)

    def _file_pieces(self, files: list[str], min_pieces: int) -> list[Piece]:
        fmt = file_format(files, self.config.format)
        if fmt == "parquet":
            return [p for path in files for p in _parquet_pieces(path, self.source)]
        ranges = {path: self._byte_range(path, fmt) for path in files}
        total = sum(end - start for start, end in ranges.values())
        # several processes: at least 4 pieces each, so that whole pieces split evenly
        wanted = 4 * min_pieces if min_pieces > 1 else 1
        piece_bytes = max(1, min(PIECE_BYTES, -(-total // wanted)))
        pieces: list[Piece] = []
        for path in files:
            if fmt == "json" and _is_json_document(path):
                pieces.append(Piece(path, "json_document", 0, self.fingerprints[path][0]))
            else:
                pieces += self._cut(path, fmt, *ranges[path], piece_bytes)
        return self._number_records(pieces)

    def _number_records(self, pieces: list[Piece]) -> list[Piece]:
        """Fine-tuning hold-out counts records across all files of the split, so each piece
        learns the index of its first record (a scan of the JSON Lines files)."""
        if self.config.kind == "text" or not self.held_out:
            return pieces
        numbered, total = [], 0
        for piece in pieces:
            numbered.append(dataclasses.replace(piece, first_record=total))
            total += _count_records(piece)
        return numbered

    def _byte_range(self, path: str, fmt: str) -> tuple[int, int]:
        """The bytes of `path` this split reads: all of them, except that a held-out
        one-document text is cut at 1 - val_fraction (at a character boundary)."""
        size = self.fingerprints[path][0]
        if not (self.held_out and fmt == "text" and self.config.sample_by == "document"):
            return 0, size
        cut = _char_boundary(path, int(size * (1.0 - self.config.val_fraction)))
        return (0, cut) if self.split == "train" else (cut, size)

    def _cut(self, path: str, fmt: str, start: int, end: int, piece_bytes: int) -> list[Piece]:
        """Byte ranges of about `piece_bytes`, each starting after a line break (`CUTS`)."""
        document = fmt == "text" and self.config.sample_by == "document"
        n = max(1, math.ceil((end - start) / piece_bytes))
        separator = CUTS["document" if document else
                         "paragraph" if fmt == "text" and self.config.sample_by == "paragraph"
                         else "line"]
        bounds, inside = [start], set()
        for i in range(1, n):
            target = start + (end - start) * i // n
            at = _after_separator(path, target, min(end, target + LONG_LINE), separator)
            if at is None and fmt == "text" and target + LONG_LINE < end:  # a long line
                at = _after_separator(path, target, min(end, target + LONG_LINE), INSIDE_LINE,
                                      at_start=True)
                at = _char_boundary(path, target) if at is None else at
                inside.add(at)
            if at is not None and bounds[-1] < at < end:
                bounds.append(at)
        bounds.append(end)
        return [Piece(path, fmt, a, b, ends_document=b not in inside and (not document or b == end),
                      starts_document=a not in inside and (not document or a == start))
                for a, b in zip(bounds, bounds[1:], strict=False) if b > a]

    def documents(self, piece: Piece) -> Iterator[Any]:
        """The piece's documents: strings (kind text) or records (kind sft), with this
        split's hold-out applied. An unreadable row raises DataError naming file and line."""
        if piece.path in self.fingerprints:  # a file rewritten, cut or deleted mid-run
            check_unchanged({piece.path: self.fingerprints[piece.path]})
        try:
            yield from self._held_out(piece, _read(piece, self.config, self.split))
        except Exception as exc:
            if isinstance(exc, DataError) and not isinstance(exc, RecordError):
                raise  # already names the file
            error = explain(exc, self.source)
            if error is None:
                raise
            raise error from exc

    def _held_out(self, piece: Piece, rows: Iterator[Any]) -> Iterator[Any]:
        fraction, keep_tail = self.config.val_fraction, self.split == "val"
        whole_file = piece.fmt == "text" and self.config.sample_by == "document"
        if not self.held_out or whole_file:
            yield from rows
        elif self.config.kind != "text":  # record i validates when (i + 1) * fraction reaches
            first = 0 if piece.fmt == "hub" else piece.first_record  # a new integer: exactly
            for i, row in enumerate(rows, first):
                if (int((i + 1) * fraction) > int(i * fraction)) == keep_tail:  # `fraction`,
                    yield row  # spread evenly (for a Hub shard: within the shard)
        else:  # every document is cut at 1 - fraction of its characters
            for text in rows:
                at = int(len(text) * (1.0 - fraction))
                yield text[at:] if keep_tail else text[:at]


def _char_boundary(path: str, offset: int) -> int:
    """`offset`, moved back to the start of a UTF-8 character (past continuation bytes)."""
    with open(path, "rb") as f:
        f.seek(max(0, offset - 3))
        window = f.read(offset - max(0, offset - 3) + 1)  # the bytes up to and at `offset`
    at = len(window) - 1
    while at > 0 and 0x80 <= window[at] < 0xC0:
        at -= 1
    return offset - (len(window) - 1 - at) if window else offset


def _after_separator(path: str, offset: int, limit: int, separator: re.Pattern[bytes],
                     at_start: bool = False) -> int | None:
    """The offset just after (`at_start`: at) the first match of `separator` at or after
    `offset` and before `limit`; None if there is none."""
    with open(path, "rb") as f:
        f.seek(max(0, offset - 1))  # the byte before: a look-behind's context
        carried = f.read(offset - max(0, offset - 1))
        position, first = offset, len(carried)  # a match starts at `offset` or later
        while position < limit:
            chunk = f.read(min(1 << 16, limit - position))
            if not chunk:
                return None
            window = carried + chunk
            found = separator.search(window, first)
            if found is not None:
                return position - len(carried) + (found.start() if at_start else found.end())
            carried, first = window[-4:], 0  # a separator, or the bytes its look-around needs
            position += len(chunk)
    return None


def _count_records(piece: Piece) -> int:
    """How many records a piece holds (non-blank JSON Lines, or a Parquet row group's rows)."""
    if piece.fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(piece.path).metadata.row_group(piece.start).num_rows
    if piece.fmt == "json_document":
        document = json.loads(_read_bytes(piece))
        return len(document) if isinstance(document, list) else 1
    with open(piece.path, "rb") as f:
        f.seek(piece.start)
        return sum(1 for line in f.read(piece.end - piece.start).split(b"\n") if line.strip())


def _is_json_document(path: str) -> bool:
    """A .json file holding one JSON list rather than one object per line."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


def _parquet_pieces(path: str, source: Source) -> list[Piece]:
    import pyarrow.parquet as pq

    try:
        groups = pq.ParquetFile(path).metadata.num_row_groups
    except Exception as exc:
        raise explain(exc, source) or DataError(f"cannot read {path}: {exc}") from None
    return [Piece(path, "parquet", group, group) for group in range(groups)]


def _hub_pieces(config: DataConfig, split: str, min_pieces: int) -> list[Piece]:
    """One piece per shard of the Hub dataset; a shard is shared by `share` pieces (each
    keeping every share-th row) when there are fewer shards than processes."""
    shards = _hub_stream(config, split).n_shards
    share = max(1, math.ceil(min_pieces / shards))
    return [Piece(config.dataset or "", "hub", shard, share, first_record=part)
            for shard in range(shards) for part in range(share)]


def _hub_stream(config: DataConfig, split: str) -> Any:
    from datasets import load_dataset

    hub_split = config.val_split if split == "val" and config.val_split else config.train_split
    try:
        return load_dataset(config.dataset, config.dataset_config, split=hub_split,
                            streaming=True)
    except (OSError, ValueError) as exc:  # offline, no such dataset, config or split
        raise DataError(f"data.dataset '{config.dataset}' (split '{hub_split}') cannot be "
                        f"read: {one_line(exc)}") from None


def _read(piece: Piece, config: DataConfig, split: str) -> Iterator[Any]:
    if piece.fmt == "text":
        yield from _text_documents(_read_bytes(piece), config.sample_by)
    elif piece.fmt == "json":
        for line in _read_bytes(piece).split("\n"):
            if line.strip():
                yield _row(json.loads(line), config)
    elif piece.fmt == "json_document":
        document = json.loads(_read_bytes(piece))
        for record in document if isinstance(document, list) else [document]:
            yield _row(record, config)
    elif piece.fmt == "parquet":
        yield from _parquet_rows(piece, config)
    else:
        yield from _hub_rows(piece, config, split)


def _read_bytes(piece: Piece) -> str:
    with open(piece.path, "rb") as f:
        f.seek(piece.start)
        data = f.read(piece.end - piece.start)
    if len(data) != piece.end - piece.start:
        raise DataError(f"data file {piece.path} changed during the run (it is shorter "
                        "than when the run started); stopped rather than train on less")
    return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")


def _text_documents(text: str, sample_by: str) -> Iterator[str]:
    if sample_by == "document":
        yield text
    elif sample_by == "line":
        yield from text[:-1].split("\n") if text.endswith("\n") else text.split("\n")
    else:
        yield from (paragraph for paragraph in text.split("\n\n") if paragraph)


def _row(record: Any, config: DataConfig) -> Any:
    """A record's text (kind text) or its fields (kinds sft, preference: `RECORD_KINDS`)."""
    if not isinstance(record, dict):
        raise RecordError(f"the record is {value_kind(record)}, not a JSON object")
    if config.kind != "text":
        kind = RECORD_KINDS[config.kind]
        problem = kind.problem(record)
        if problem:
            raise RecordError(f"{kind.what} is malformed: {problem}")
        return {k: record[k] for k in kind.columns if k in record}
    text = record.get(config.text_column)
    if not isinstance(text, str):
        raise RecordError(f"a row's text is {value_kind(text)}, not a string")
    return text


def _parquet_rows(piece: Piece, config: DataConfig) -> Iterator[Any]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(piece.path)
    wanted = [config.text_column] if config.kind == "text" else \
        RECORD_KINDS[config.kind].columns
    columns = [c for c in wanted if c in parquet.schema_arrow.names]
    if config.kind == "text" and not columns:
        raise DataError(f"{piece.path} has no column '{config.text_column}' (columns: "
                        f"{parquet.schema_arrow.names}); set data.text_column")
    for record in parquet.read_row_group(piece.start, columns=columns).to_pylist():
        yield _row(record, config)


def _hub_rows(piece: Piece, config: DataConfig, split: str) -> Iterator[Any]:
    stream = _hub_stream(config, split)
    shard = stream.shard(num_shards=stream.n_shards, index=piece.start)
    for i, record in enumerate(shard):
        if i % piece.end == piece.first_record:
            yield _row(record, config)
