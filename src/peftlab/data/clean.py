"""Data clean-up before tokenization: normalisation, duplicates, length filters, leakage.

Small fine-tuning sets are hurt more by bad rows than large ones: a duplicated row is
trained on twice as often, and a validation row that also sits in the training set makes
the validation loss look better than the model is. Every step here is optional
(:class:`~peftlab.config.CleanConfig`) and counted, so the data report says exactly what
was removed and why.

Rows stay plain dicts in their original format; a ``text_of(row)`` callback gives the
(prompt, answer) text used for hashing and length checks. Rows it can't read (it returns
None) pass through untouched, so the SFT builder can report them with file and row.

Near duplicates: MinHash signatures over word shingles, LSH banding to find candidate
pairs, and the exact Jaccard similarity of the shingle sets to confirm each candidate.
The banding is tuned for recall at the threshold (the exact check removes the false
candidates), and the permutations are seeded, so the result is deterministic.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable
from typing import Any

import numpy as np

from peftlab.config import CleanConfig

TextOf = Callable[[dict[str, Any]], "tuple[str, str] | None"]
MAX_EXAMPLES = 20  # removed rows listed by number in the report, per step

_INVISIBLE = re.compile("[\u200b\u200c\u200d\u2060\ufeff\u00ad]")  # zero-width chars, BOM, soft hyphen
_BLANK_LINES = re.compile(r"\n{3,}")
_SPACES = re.compile(r"\s+")
_WORDS = re.compile(r"\w+")


# ----------------------------------------------------------------------------- normalisation


def normalize_text(text: str) -> str:
    """NFKC, unified line ends, no invisible characters, no trailing spaces, <= 1 blank line.

    Leading indentation and runs of spaces inside a line are kept: answers may hold code.
    """
    text = unicodedata.normalize("NFKC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _INVISIBLE.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


def normalize_record(record: Any) -> Any:
    """A copy of ``record`` with :func:`normalize_text` applied to every string in it."""
    if isinstance(record, str):
        return normalize_text(record)
    if isinstance(record, dict):
        return {k: normalize_record(v) for k, v in record.items()}
    if isinstance(record, list):
        return [normalize_record(v) for v in record]
    return record


def dedup_key(text: str) -> str:
    """Hash of the text with case and whitespace differences removed."""
    canon = _SPACES.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()
    return hashlib.blake2b(canon.encode("utf-8"), digest_size=16).hexdigest()


# ----------------------------------------------------------------------------- MinHash + LSH


def word_shingles(text: str, size: int) -> set[str]:
    """Lower-cased word ``size``-grams; a text with fewer words is one shingle."""
    words = _WORDS.findall(unicodedata.normalize("NFKC", text).casefold())
    if not words:
        return set()
    if len(words) <= size:
        return {" ".join(words)}
    return {" ".join(words[i:i + size]) for i in range(len(words) - size + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def lsh_bands(threshold: float, num_perm: int, recall: float = 0.99) -> tuple[int, int]:
    """(bands, rows per band): the most selective banding whose chance of making a pair
    with Jaccard similarity ``threshold`` a candidate, ``1 - (1 - t**r)**b``, is >= ``recall``."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if 1.0 - (1.0 - threshold**rows) ** bands >= recall:
            best = (bands, rows)
    return best


class MinHasher:
    """Seeded MinHash with ``num_perm`` hash functions ``h_i(x) = mix64(x ^ s_i)``.

    ``x`` is a 64-bit hash of the shingle, ``s_i`` a seeded random 64-bit key and mix64 the
    splitmix64 finaliser (a bijection on 64-bit integers with strong avalanche), so every
    ``h_i`` behaves as an independent random permutation. (The textbook ``(a x + b) mod p``
    needs 128-bit products; with both factors cut to 32 bits it is nearly monotone in ``x``
    and the Jaccard estimates come out biased.) numpy's uint64 arithmetic wraps, as wanted.
    """

    def __init__(self, num_perm: int = 128, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self.keys = rng.integers(0, np.iinfo(np.uint64).max, size=num_perm, dtype=np.uint64,
                                 endpoint=True)

    def signature(self, shingles: set[str]) -> np.ndarray:
        if not shingles:
            return np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        x = np.array(sorted(_hash64(s) for s in shingles), dtype=np.uint64)
        return _mix64(x[:, None] ^ self.keys[None, :]).min(axis=0)


def _mix64(v: np.ndarray) -> np.ndarray:
    v = v ^ (v >> np.uint64(30))
    v = v * np.uint64(0xBF58476D1CE4E5B9)
    v = v ^ (v >> np.uint64(27))
    v = v * np.uint64(0x94D049BB133111EB)
    return v ^ (v >> np.uint64(31))


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


class NearDuplicateIndex:
    """Shingle sets indexed by LSH bands; :meth:`find` returns the first similar entry."""

    def __init__(self, threshold: float, shingle_size: int = 3, num_perm: int = 128,
                 seed: int = 0):
        self.threshold = threshold
        self.shingle_size = shingle_size
        self.hasher = MinHasher(num_perm, seed)
        self.bands, self.rows = lsh_bands(threshold, num_perm)
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self.sets: dict[int, set[str]] = {}

    def _band_keys(self, shingles: set[str]) -> list[bytes]:
        sig = self.hasher.signature(shingles)
        return [sig[i * self.rows:(i + 1) * self.rows].tobytes() for i in range(self.bands)]

    def find(self, text: str) -> tuple[int | None, set[str], list[bytes]]:
        """(id of an indexed text with Jaccard >= threshold or None, shingles, band keys)."""
        shingles = word_shingles(text, self.shingle_size)
        if not shingles:
            return None, shingles, []
        keys = self._band_keys(shingles)
        seen: set[int] = set()
        for band, key in zip(self.buckets, keys, strict=True):
            for other in band.get(key, ()):
                if other not in seen:
                    seen.add(other)
                    if jaccard(shingles, self.sets[other]) >= self.threshold:
                        return other, shingles, keys
        return None, shingles, keys

    def add(self, item: int, shingles: set[str], keys: list[bytes]) -> None:
        if not shingles:
            return
        self.sets[item] = shingles
        for band, key in zip(self.buckets, keys, strict=True):
            band.setdefault(key, []).append(item)


# ----------------------------------------------------------------------------- cleaning


def clean_rows(
    rows: list[dict[str, Any]],
    cfg: CleanConfig,
    text_of: TextOf,
    count_tokens: Callable[[str], int] | None = None,
    seed: int = 0,
    row_numbers: list[int] | None = None,
) -> tuple[list[dict[str, Any]], list[int], dict[str, Any]]:
    """Normalise, filter by length, drop exact then near duplicates (first occurrence kept).

    Returns the kept (possibly normalised) rows, their indices in ``rows`` and a report of
    counts; ``removed`` lists up to 20 removed rows per step by ``row_numbers`` (file rows;
    default: 1-based positions), duplicates as ``[row, row it duplicates]``.
    """
    num = _numbering(rows, row_numbers)
    report: dict[str, Any] = {"rows_in": len(rows)}
    removed: dict[str, list] = {}
    if cfg.normalize:
        normalised = [normalize_record(r) for r in rows]
        report["normalized_rows_changed"] = sum(a != b for a, b in zip(rows, normalised, strict=True))
        rows = normalised
    texts = [text_of(r) for r in rows]
    keep = list(range(len(rows)))

    if cfg.min_tokens > 0 or cfg.max_tokens is not None:
        if count_tokens is None:
            raise ValueError("length filters (data.clean.min_tokens/max_tokens) need count_tokens")
        counts = {"empty": 0, "too_short": 0, "too_long": 0}
        kept = []
        for i in keep:
            why = _length_problem(texts[i], cfg, count_tokens)
            if why is None:
                kept.append(i)
            else:
                counts[why] += 1
                _note(removed, why, num[i])
        keep = kept
        report.update(counts)

    if cfg.dedup:
        first: dict[str, int] = {}
        kept = []
        for i in keep:
            if texts[i] is None:
                kept.append(i)
                continue
            key = dedup_key(_joined(texts[i]))
            if key in first:
                _note(removed, "exact_duplicates", [num[i], num[first[key]]])
            else:
                first[key] = i
                kept.append(i)
        report["exact_duplicates"] = len(keep) - len(kept)
        keep = kept

    if cfg.near_dedup:
        index = NearDuplicateIndex(cfg.near_threshold, cfg.shingle_size, cfg.num_perm, seed)
        kept = []
        for i in keep:
            if texts[i] is None:
                kept.append(i)
                continue
            other, shingles, keys = index.find(_joined(texts[i]))
            if other is None:
                index.add(i, shingles, keys)
                kept.append(i)
            else:
                _note(removed, "near_duplicates", [num[i], num[other]])
        report["near_duplicates"] = len(keep) - len(kept)
        keep = kept

    report["rows_out"] = len(keep)
    if removed:
        report["removed"] = removed
    return [rows[i] for i in keep], keep, report


def remove_leakage(
    train: list[dict[str, Any]],
    validation: list[dict[str, Any]],
    cfg: CleanConfig,
    text_of: TextOf,
    seed: int = 0,
    train_row_numbers: list[int] | None = None,
    validation_row_numbers: list[int] | None = None,
) -> tuple[list[dict[str, Any]], list[int], dict[str, Any]]:
    """Drop training rows that duplicate a validation row, exactly or nearly
    (Jaccard >= ``cfg.near_threshold``). Returns kept rows, their indices and counts;
    ``removed`` lists ``[train row, validation row]`` pairs."""
    train_num = _numbering(train, train_row_numbers)
    val_num = _numbering(validation, validation_row_numbers)
    exact_keys: dict[str, int] = {}
    index = NearDuplicateIndex(cfg.near_threshold, cfg.shingle_size, cfg.num_perm, seed)
    for j, row in enumerate(validation):
        text = text_of(row)
        if text is None:
            continue
        exact_keys.setdefault(dedup_key(_joined(text)), j)
        other, shingles, keys = index.find(_joined(text))
        if other is None:
            index.add(j, shingles, keys)
    counts = {"exact": 0, "near": 0}
    removed: dict[str, list] = {}
    keep = []
    for i, row in enumerate(train):
        text = text_of(row)
        if text is None:
            keep.append(i)
            continue
        j = exact_keys.get(dedup_key(_joined(text)))
        kind = "exact"
        if j is None:
            j, _, _ = index.find(_joined(text))
            kind = "near"
        if j is None:
            keep.append(i)
        else:
            counts[kind] += 1
            _note(removed, kind, [train_num[i], val_num[j]])
    report: dict[str, Any] = {**counts, "removed_from_train": len(train) - len(keep)}
    if removed:
        report["removed"] = removed
    return [train[i] for i in keep], keep, report


def summary(report: dict[str, Any]) -> str:
    """One line per split for the console, from the ``cleaning`` entry of the data report."""
    lines = []
    for split in ("train", "validation"):
        r = report.get(split)
        if not r:
            continue
        parts = [f"{r['rows_in']} -> {r['rows_out']} rows"]
        for key, what in (("normalized_rows_changed", "normalised"), ("empty", "empty"),
                          ("too_short", "too short"), ("too_long", "too long"),
                          ("exact_duplicates", "exact duplicates"),
                          ("near_duplicates", "near duplicates")):
            if key in r:
                parts.append(f"{r[key]} {what}")
        lines.append(f"cleaning {split}: " + ", ".join(parts))
    leak = report.get("leakage")
    if leak:
        lines.append(f"cleaning leakage: removed {leak['removed_from_train']} training rows that "
                     f"duplicate validation rows ({leak['exact']} exact, {leak['near']} near)")
    return "\n".join(lines)


def _length_problem(text: tuple[str, str] | None, cfg: CleanConfig,
                    count_tokens: Callable[[str], int]) -> str | None:
    if text is None:
        return None
    prompt, answer = text
    if not answer.strip():
        return "empty"
    n_answer = count_tokens(answer)
    if n_answer < cfg.min_tokens:
        return "too_short"
    if cfg.max_tokens is not None and n_answer + count_tokens(prompt) > cfg.max_tokens:
        return "too_long"
    return None


def _numbering(rows: list, row_numbers: list[int] | None) -> list[int]:
    if row_numbers is None:
        return list(range(1, len(rows) + 1))
    if len(row_numbers) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(row_numbers)} row numbers")
    return list(row_numbers)


def _joined(text: tuple[str, str]) -> str:
    return text[0] + "\n" + text[1]


def _note(removed: dict[str, list], step: str, what: Any) -> None:
    items = removed.setdefault(step, [])
    if len(items) < MAX_EXAMPLES:
        items.append(what)
