"""Read training rows from JSONL, JSON, CSV/TSV and Parquet into plain dicts.

Bad data is the most common reason a fine-tuning run dies, often hours in. Every
problem is reported as ``file:row: what is wrong`` so it can be fixed in an editor,
and ``on_error="skip"`` lets a run continue while counting what was dropped.
Rows are 1-based: the line number for JSONL, the line a record starts on for CSV/TSV (the
header is line 1, as in an editor or a spreadsheet; a quoted field may span lines), the row
for Parquet and the array index for JSON.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_EXTENSIONS = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet")
TEXT_SUFFIXES = (".txt", ".raw", ".text")  # plain text: read by read_text_documents
MAX_REPORTED_ERRORS = 20


class DataError(ValueError):
    """A problem with the data, naming the file, the 1-based row and the field."""


@dataclass
class ReadReport:
    """What :func:`read_records` read and skipped; ``row_numbers[i]`` is record i's row."""

    path: str
    rows_read: int = 0
    rows_skipped: int = 0
    skipped: list[str] = field(default_factory=list)
    row_numbers: list[int] = field(default_factory=list, repr=False)

    def note_skip(self, message: str) -> None:
        self.rows_skipped += 1
        keep_message(self.skipped, message)


def keep_message(messages: list[str], message: str) -> None:
    """Keep the first :data:`MAX_REPORTED_ERRORS` messages of bad rows for the report."""
    if len(messages) < MAX_REPORTED_ERRORS:
        messages.append(message)


def skip_or_raise(error: DataError, on_error: str, messages: list[str]) -> None:
    """A bad row: raised with ``on_error: raise``; with ``skip`` its message is kept for the
    data report (the caller counts the row as dropped)."""
    if on_error != "skip":
        raise error
    keep_message(messages, str(error))


@dataclass
class RowStats:
    """What happened to the rows of one source on their way to training examples."""

    source: str = ""
    max_length: int | None = None
    rows: int = 0
    kept: int = 0
    dropped_invalid: int = 0
    dropped_too_long: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    max_len: int = 0
    mean_len: float = 0.0
    errors: list[str] = field(default_factory=list, repr=False)

    def invalid(self, error: DataError, on_error: str) -> None:
        """Count a row that could not be read into an example (or raise, see skip_or_raise)."""
        skip_or_raise(error, on_error, self.errors)
        self.dropped_invalid += 1


# A row is (row number, record) or (row number, DataError) so one loop handles both modes.
Row = tuple[int, "dict[str, Any] | DataError"]


def read_records(
    path: str | Path, on_error: str = "raise", max_rows: int | None = None
) -> tuple[list[dict[str, Any]], ReadReport]:
    """Read up to ``max_rows`` records; bad rows raise or, with ``on_error="skip"``, are counted.
    ``path`` is a data file or a Hugging Face ``Dataset.save_to_disk`` directory."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    p = Path(path)
    name = str(path)
    suffix = p.suffix.lower()
    if p.is_dir() and _is_dataset_dir(p):
        rows: Iterator[Row] = _dataset_dir_rows(p, name)
    elif p.is_dir():
        raise DataError(f"{name}: a directory, but not one written by datasets' save_to_disk "
                        "(no state.json); give a data file "
                        f"({', '.join(SUPPORTED_EXTENSIONS)}) or such a directory")
    elif suffix not in SUPPORTED_EXTENSIONS:
        raise DataError(
            f"{name}: unsupported file type {suffix or '(no extension)'!r}; "
            f"supported: {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    elif not p.exists():
        raise DataError(f"{name}: file not found")
    elif not p.is_file():
        raise DataError(f"{name}: not a file")
    elif p.stat().st_size == 0:
        raise DataError(f"{name}: file is empty")
    elif suffix in (".jsonl", ".ndjson"):
        rows = _jsonl_rows(p, name)
    elif suffix == ".json":
        rows = _json_rows(p, name)
    elif suffix == ".parquet":
        rows = _parquet_rows(p, name)
    else:
        rows = _csv_rows(p, name, "\t" if suffix == ".tsv" else ",")

    records: list[dict[str, Any]] = []
    report = ReadReport(path=name)
    for row, item in rows:
        if max_rows is not None and len(records) >= max_rows:
            break
        if isinstance(item, DataError):
            if on_error == "raise":
                raise item
            report.note_skip(str(item))
            continue
        records.append(item)
        report.row_numbers.append(row)
    report.rows_read = len(records)
    if not records:
        if report.rows_skipped:
            raise DataError(
                f"{name}: no usable rows ({report.rows_skipped} skipped); "
                f"first problem: {report.skipped[0]}"
            )
        if max_rows != 0:
            raise DataError(f"{name}: file is empty (no data rows)")
    return records, report


def read_text_documents(path: str | Path, split: str = "auto") -> list[tuple[int, str]]:
    """Documents of a plain-text file as ``(first line number, text)``.

    ``split``: ``line`` (one document per non-blank line), ``paragraph`` (documents separated
    by blank lines; their lines are kept, joined by newlines) or ``auto`` (``paragraph`` when
    the file has a blank line between two non-blank ones, else ``line``).
    """
    if split not in ("auto", "line", "paragraph"):
        raise ValueError(f"split must be 'auto', 'line' or 'paragraph', got {split!r}")
    p = Path(path)
    name = str(path)
    if not p.exists():
        raise DataError(f"{name}: file not found")
    if not p.is_file():
        raise DataError(f"{name}: not a file")
    lines = _read_text(p, name).splitlines()
    if split == "auto":
        filled = [i for i, line in enumerate(lines) if line.strip()]
        gap = bool(filled) and filled[-1] - filled[0] + 1 > len(filled)  # a blank line inside
        split = "paragraph" if gap else "line"
    docs: list[tuple[int, str]] = []
    if split == "line":
        docs = [(n, line.strip()) for n, line in enumerate(lines, start=1) if line.strip()]
    else:
        start, current = 0, []
        for n, line in enumerate(lines + [""], start=1):
            if line.strip():
                start = start or n
                current.append(line.rstrip())
            elif current:
                docs.append((start, "\n".join(current)))
                start, current = 0, []
    if not docs:
        raise DataError(f"{name}: file is empty (no non-blank lines)")
    return docs


def _jsonl_rows(p: Path, name: str) -> Iterator[Row]:
    with p.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # UTF-8 byte-order mark written by some editors
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield lineno, DataError(f"{name}: not valid UTF-8 at line {lineno}")
                continue
            if not line.strip():
                continue
            try:  # without its newline: a line cut short is reported at its end, not at
                obj = json.loads(line.rstrip("\r\n"))  # "column 1" of a phantom next line
            except json.JSONDecodeError as exc:
                yield (
                    lineno,
                    DataError(f"{name}:{lineno}: malformed JSON ({exc.msg.removesuffix(' at')}, column {exc.colno})"),
                )
                continue
            if not isinstance(obj, dict):
                yield (
                    lineno,
                    DataError(f"{name}:{lineno}: expected a JSON object, got {_json_type(obj)}"),
                )
                continue
            yield lineno, obj


def _json_rows(p: Path, name: str) -> Iterator[Row]:
    text = _read_text(p, name)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{name}:{exc.lineno}: malformed JSON ({exc.msg.removesuffix(' at')}, column {exc.colno})"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(
            f'{name}: expected a JSON list of objects (or {{"data": [...]}}), '
            f"got {_json_type(data)}"
        )
    for index, obj in enumerate(data, start=1):
        if isinstance(obj, dict):
            yield index, obj
        else:
            yield index, DataError(f"{name}:{index}: expected a JSON object, got {_json_type(obj)}")


def _csv_rows(p: Path, name: str, delimiter: str) -> Iterator[Row]:
    text = _read_text(p, name)
    csv.field_size_limit(2**31 - 1)  # the default (128 KiB) is too small for long documents
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise DataError(f"{name}: no header row")
        header = [h.strip() for h in header]
        dupes = sorted({h for h in header if header.count(h) > 1})
        if dupes:
            raise DataError(f"{name}: duplicate column names in header: {', '.join(dupes)}")
        end = reader.line_num  # the last line read so far (the header's)
        for values in reader:
            index, end = end + 1, reader.line_num  # the line this record starts on
            if not values:
                continue  # blank line
            if len(values) > len(header):
                yield (
                    index,
                    DataError(
                        f"{name}:{index}: row has {len(values)} values but the "
                        f"header has {len(header)} columns"
                    ),
                )
                continue
            if len(values) < len(header):
                missing = header[len(values)]
                yield (
                    index,
                    DataError(
                        f"{name}:{index}: field {missing!r} is missing "
                        f"(available: {', '.join(header[: len(values)])})"
                    ),
                )
                continue
            yield index, dict(zip(header, values, strict=True))
    except csv.Error as exc:
        raise DataError(
            f"{name}:{reader.line_num}: malformed {'TSV' if delimiter == chr(9) else 'CSV'} ({exc})"
        ) from None


def _is_dataset_dir(p: Path) -> bool:
    """What ``Dataset.save_to_disk`` (state.json) or ``DatasetDict.save_to_disk``
    (dataset_dict.json) writes."""
    return (p / "state.json").is_file() or (p / "dataset_dict.json").is_file()


def _dataset_dir_rows(p: Path, name: str) -> Iterator[Row]:
    if (p / "dataset_dict.json").is_file():
        splits = sorted(d.name for d in p.iterdir() if (d / "state.json").is_file())
        raise DataError(f"{name}: a DatasetDict directory (splits: {', '.join(splits)}); name "
                        f"one split's directory, e.g. {p / (splits[0] if splits else 'train')}")
    try:
        import datasets  # optional dependency, needed only for these directories
    except ImportError:
        raise DataError(f"{name}: a Hugging Face datasets directory; reading it needs the "
                        "'datasets' package (pip install 'peftlab[datasets]')") from None
    try:
        ds = datasets.load_from_disk(str(p))
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{name}: not a readable save_to_disk directory ({first})") from None
    for index, row in enumerate(ds, start=1):
        yield index, dict(row)


def _parquet_rows(p: Path, name: str) -> Iterator[Row]:
    import pyarrow as pa  # heavy (~0.3 s): only when a Parquet file is read
    import pyarrow.parquet as pq

    try:
        pfile = pq.ParquetFile(p)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{name}: not a readable Parquet file ({exc})") from None
    index = 0
    for batch in pfile.iter_batches(batch_size=1024):
        for obj in batch.to_pylist():
            index += 1
            yield index, obj


def _read_text(p: Path, name: str) -> str:
    data = p.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{name}: not valid UTF-8 at line {line}") from None


def _json_type(obj: Any) -> str:
    names = {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }
    return names.get(type(obj), type(obj).__name__)
