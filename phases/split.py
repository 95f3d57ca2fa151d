"""split: de-duplicate data/formatted/all.jsonl and divide it into train, val and test.

Reads top to bottom:

1. scan    stream all.jsonl (in worker processes for big files); per record keep 8-byte keys
           in flat arrays, never the record: the exact line, the normalized prompt, the
           normalized answer, the stratum, and the line's offset
2. dedup   drop exact, then normalized duplicates (the first occurrence is kept)
3. group   records whose prompts normalize alike form one group, which goes to one split
4. assign  order groups by a seeded hash, fill train/val/test by cumulative record counts,
           per stratum when `data.split.stratify` is set
5. write   stream all.jsonl again, copy each kept line unchanged into its split file
6. check   measure leakage from what was assigned: prompts and records in two splits

Memory: about 50 bytes a record (the key arrays and the sorts over them) plus two blocks of
the file, so a million records stay near 250 MB.

Normalization, for the prompt and answer keys: JSON escapes are dropped, each character is
lower-cased, and only letters and digits are kept (whitespace, punctuation and symbols go),
so "Hello,  World!" equals "hello world" and "HELLO\nWORLD". The prompt is every turn but the
final assistant turn, roles included. The scan reads the canonical lines that `format`
writes (orjson; keys conversations, tools, meta in that order; turns {"role", "content"}) as
bytes without parsing them; any other line is parsed and re-serialized canonically first,
so both roads give the same keys.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import re
import signal
import time
from array import array
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import compress
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import xxhash

from factory.errors import InputError
from factory.io import AtomicOutput
from factory.phase import Phase, PhaseContext
from factory.status import fork_is_safe

SPLITS = ("train", "val", "test")
PAIRS = (("train", "val"), ("train", "test"), ("val", "test"))

CHUNK_BYTES = 4 << 20
"""The scan and the write work on line-aligned blocks of about this size (~5-10k records)."""

PARALLEL_MIN_BYTES = 64 << 20
"""Files at least this large are scanned by one worker process per CPU (at most MAX_WORKERS)."""

MAX_WORKERS = 8
MAX_STRATA_SHOWN = 100
"""Metrics list per-split counts for at most this many stratum values (the most frequent)."""

MISSING = "(missing)"
_U64 = (1 << 64) - 1

# canonical line layout (orjson, as `format` writes it)
_HEAD = b'{"conversations":[{"role":"'
_TURNS = 18  # len(b'{"conversations":[')
_LAST = b'{"role":"assistant","content":"'
_END_ONLY = b'"}]}'  # the line ends right after the conversations
_END_MORE = b'"}],"'  # more top-level keys follow (tools, meta)

_LOWER = bytes.maketrans(bytes(range(65, 91)), bytes(range(97, 123)))
_NOT_ALNUM = bytes(c for c in range(128) if not chr(c).isalnum())
_ESCAPE = re.compile(rb"\\(?:u[0-9a-fA-F]{4}|.)").sub  # a JSON escape stands for a control character or punctuation
_ASCII = bytes(range(128))
_WINDOW = 128  # raw bytes read at the start of a long answer for its pre key
_EDGE = 48  # normalized bytes that the pre key hashes


def run(ctx: PhaseContext) -> dict[str, Any]:
    return split_records(ctx)


def split_records(ctx: PhaseContext, workers: int | None = None, chunk_bytes: int = CHUNK_BYTES) -> dict[str, Any]:
    laps = _Laps()
    cfg, ws, log = ctx.config.data, ctx.workspace, ctx.log
    ratios = (cfg.split.train, cfg.split.val, cfg.split.test)
    seed = cfg.split.seed & _U64
    source = ws.formatted_file
    if not source.is_file():
        raise InputError(f"{ws.rel(source)} not found: run `factory run format` first to create it from data/raw")

    # 1. scan -------------------------------------------------------------------------
    blocks = _blocks(source, chunk_bytes)
    if workers is None:
        workers = _default_workers(source.stat().st_size)
    ctx.progress.start(None, "records scanned")
    scan = _Scan()
    for part in _scan_all(source, blocks, seed, cfg.split.stratify, workers, log):
        scan.add(part)
        ctx.progress.advance(part["records"])
    n = scan.records
    exact, prompt = scan.array("exact"), scan.array("prompt")
    log.info("split: scanned %d records (%d parsed the slow way)", n, scan.slow)
    laps("scan")

    # 2. dedup ------------------------------------------------------------------------
    keep = np.arange(n)
    duplicates_exact = duplicates_normalized = 0
    if cfg.dedup.exact:
        keep = np.sort(np.unique(exact, return_index=True)[1])
        duplicates_exact = n - keep.size
    norm = scan.normalized_keys(keep, source)
    if cfg.dedup.normalized:
        first = np.sort(np.unique(norm[keep], return_index=True)[1])
        duplicates_normalized = keep.size - first.size
        keep = keep[first]
    kept = int(keep.size)

    needed = [name for name, r in zip(SPLITS, ratios) if r > 0]
    if kept < len(needed):
        raise InputError(
            f"{kept} record(s) left after de-duplication ({n} read, {duplicates_exact} exact and "
            f"{duplicates_normalized} normalized duplicates removed), but {', '.join(needed)} each need at "
            f"least one: add data to data/raw, or set the ratio of a split to 0 in data.split"
        )

    # 3. group ------------------------------------------------------------------------
    # A record's group key is its prompt key; with group_by_prompt off, or a record with no
    # prompt, it is the record's own normalized key (so normalized duplicates kept by
    # dedup.normalized: false still stay together).
    empty_prompt = xxhash.xxh3_64_intdigest(b"", seed)
    gkey = norm[keep]
    if cfg.split.group_by_prompt:
        gkey = np.where(prompt[keep] != empty_prompt, prompt[keep], gkey)
    # np.unique sorts by key, and keys are seeded hashes: a seeded, input-order-free order.
    group_keys, group_first, group_of, group_size = np.unique(
        gkey, return_index=True, return_inverse=True, return_counts=True)
    groups = int(group_keys.size)
    if groups < len(needed):
        raise InputError(
            f"the {kept} records share only {groups} distinct prompt(s), and records with one prompt stay in "
            f"one split, so {', '.join(needed)} cannot each get one: add records with other prompts, or set "
            f"data.split.group_by_prompt: false"
        )

    # 4. assign -----------------------------------------------------------------------
    if cfg.split.stratify:
        if scan.missing == n:
            raise InputError(
                f"data.split.stratify: {cfg.split.stratify!r} is in no record: use `assistant` (the last "
                f"assistant turn), a key of the records' `meta`, or a top-level key"
            )
        if scan.missing:
            log.warning("split: %d of %d records have no %r; they form the stratum %r",
                        scan.missing, n, cfg.split.stratify, MISSING)
        values, stratum_of = np.unique(scan.array("stratum")[keep], return_inverse=True)
        group_stratum = stratum_of.reshape(-1)[group_first]
    else:
        values, group_stratum = np.zeros(1, np.uint64), np.zeros(groups, np.int64)
    group_split = _assign(group_keys, group_size, group_stratum, ratios, int(values.size))
    group_split = _fill_empty_splits(group_split, group_size, ratios, kept, groups)
    record_split = np.full(n, -1, np.int8)
    record_split[keep] = group_split[group_of.reshape(-1)]

    laps("dedup_group_assign")

    # 5. write ------------------------------------------------------------------------
    counts = {name: int(np.count_nonzero(record_split == k)) for k, name in enumerate(SPLITS)}
    ctx.progress.start(kept, "records written")
    files = _write(source, blocks, scan, record_split, ws, ctx.progress)
    for name in SPLITS:
        files[name]["records"] = counts[name]

    laps("write")

    # 6. check ------------------------------------------------------------------------
    in_split = record_split >= 0
    with_prompt = in_split & (prompt != empty_prompt)
    shared_prompts = _shared_between_splits(prompt[with_prompt], record_split[with_prompt])
    shared_records = _shared_between_splits(norm[in_split], record_split[in_split])
    leakage: dict[str, Any] = {
        f"{a}_{b}": {"prompts": shared_prompts[(a, b)], "records": shared_records[(a, b)]} for a, b in PAIRS
    }
    leakage["total"] = sum(v["prompts"] + v["records"] for v in leakage.values())
    if leakage["total"]:
        log.warning("split: %d prompts/records are shared between splits (group_by_prompt: %s)",
                    leakage["total"], cfg.split.group_by_prompt)

    laps("check")

    metrics = {
        "records_in": n,
        "duplicates_exact": duplicates_exact,
        "duplicates_normalized": duplicates_normalized,
        "records_out": kept,
        "groups": groups,
        "largest_group": int(group_size.max()),
        "group_by_prompt": cfg.split.group_by_prompt,
        "counts": counts,
        "ratios_requested": dict(zip(SPLITS, ratios)),
        "ratios_actual": {name: round(counts[name] / kept, 6) for name in SPLITS},
        "seed": cfg.split.seed,
        "stratify": cfg.split.stratify,
        "strata": _strata(record_split, keep, scan, values) if cfg.split.stratify else None,
        "strata_distinct": int(values.size) if cfg.split.stratify else None,
        "leakage": leakage,
        "files": files,
        "seconds": round(sum(laps.seconds.values()), 3),
        "seconds_by_step": laps.seconds,
    }
    log.info("split: %d in, %d exact + %d normalized duplicates dropped, %d groups -> train %d, val %d, test %d",
             n, duplicates_exact, duplicates_normalized, groups, counts["train"], counts["val"], counts["test"])
    return metrics


PHASE = Phase(
    name="split",
    summary="de-duplicate data/formatted/all.jsonl and split it into train/val/test without prompt leakage",
    metrics="split",
    run=run,
    config_sections=("data",),
    inputs=lambda cfg, ws: [ws.formatted_file],
    outputs=lambda cfg, ws: [ws.split_file(name) for name in SPLITS],
)


class _Laps:
    """Seconds per step, for the metrics."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, step: str) -> None:
        now = time.perf_counter()
        self.seconds[step] = round(now - self._last, 3)
        self._last = now


# --- 1. scan ---------------------------------------------------------------------------


def _blocks(path: Path, chunk_bytes: int) -> list[tuple[int, int]]:
    """Line-aligned byte ranges covering the file."""
    size = path.stat().st_size
    bounds = [0]
    with open(path, "rb") as f:
        while bounds[-1] + chunk_bytes < size:
            f.seek(bounds[-1] + chunk_bytes)
            f.readline()
            if f.tell() >= size:
                break
            bounds.append(f.tell())
    bounds.append(size)
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _default_workers(size: int) -> int:
    if size < PARALLEL_MIN_BYTES:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_WORKERS))


def _scan_all(path: Path, blocks: list[tuple[int, int]], seed: int, stratify: str | None, workers: int, log):
    jobs = [(str(path), start, end, seed, stratify) for start, end in blocks]
    if workers <= 1 or len(jobs) <= 1:
        yield from map(_scan_block, jobs)
        return
    # fork is instant; with other threads alive (a progress display) forking is unsafe.
    method = "fork" if fork_is_safe() and "fork" in multiprocessing.get_all_start_methods() else "spawn"
    workers = min(workers, len(jobs))
    log.info("split: scanning %d blocks with %d worker processes (%s)", len(jobs), workers, method)
    with multiprocessing.get_context(method).Pool(workers, initializer=_worker_signals) as pool:
        yield from pool.imap(_scan_block, jobs)


def _worker_signals() -> None:
    # Ctrl-C is handled by the parent, which terminates the pool; SIGTERM just ends a worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _scan_block(job: tuple[str, int, int, int, str | None]) -> dict[str, Any]:
    """Keys for every record of one block. Runs in a worker process for large files."""
    path, start, end, seed, stratify = job
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    h = xxhash.xxh3_64_intdigest
    keys = {name: array("Q") for name in _Scan.FIELDS}
    add_exact, add_prompt, add_pre, add_full, add_offset, add_stratum = (
        keys[name].append for name in ("exact", "prompt", "pre", "full", "offset", "stratum"))
    names: dict[int, str] = {}
    slow = missing = blank = 0
    by_answer = stratify == "assistant"
    position = start
    for line in data.split(b"\n"):
        offset, position = position, position + len(line) + 1
        if not line:
            blank += 1
            continue
        add_exact(h(line, seed))
        add_offset(offset)
        try:
            head, answer, tail, record = _segments(line)
        except ValueError:
            raise InputError(
                f"{path}, line {_line_number(path, offset)}: not a record with `conversations` (a list of "
                f"{{role, content}} turns); the file is written by `factory run format`: run it again"
            ) from None
        slow += record is not None
        # (the normalization is written out here, not called: this loop runs per record)
        if b"\\" in head:
            head = _ESCAPE(b"", head)
        prompt_key = h(head.translate(_LOWER, _NOT_ALNUM) if head.isascii() else _normalize_unicode(head), seed)
        add_prompt(prompt_key)
        # The answer: a `pre` key from its normalized opening, and the `full` key of the
        # whole normalized answer N, both seeded with the prompt key. A normalized prefix is
        # a prefix of N (the normalization goes character by character), so equal N give
        # equal pre keys. For a long answer only a window at its start is normalized; its
        # full key is computed after the scan, only where its pre key is not unique (same
        # prompt, same opening: rare). full stays 0 until then. The \0 after the opening
        # keeps pre keys apart from full keys.
        opening = b""
        if len(answer) > 2 * _WINDOW:
            cut = _WINDOW
            while 0x80 <= answer[cut] < 0xC0:  # cut at the start of a UTF-8 character
                cut -= 1
            opening = answer[:cut]
            if b"\\" in opening:
                opening = _ESCAPE(b"", opening)
            opening = opening.translate(_LOWER, _NOT_ALNUM) if opening.isascii() else _normalize_unicode(opening)
            if len(opening) >= _EDGE + 4:  # a \uXXXX escape cut by the window leaves at most 4 characters
                add_pre(h(opening[:_EDGE] + b"\0", prompt_key))
                add_full(0)
        if len(opening) < _EDGE + 4:
            text = _normalize(answer)
            add_pre(h(text[:_EDGE] + b"\0", prompt_key))
            add_full(h(text, prompt_key) or 1)
        if stratify:
            if by_answer:
                value = answer or None
            elif record is not None:
                value = _field_from_record(record, stratify)
            else:
                value = _field_from_tail(tail, stratify) if stratify.encode() in tail else None
            if value is None:
                missing += 1
                key = 0
            else:
                key = h(value, 1) or 1
            add_stratum(key)
            if key not in names and len(names) < 4 * MAX_STRATA_SHOWN:
                names[key] = MISSING if value is None else _show(value, by_answer)
    blank -= data.endswith(b"\n")  # the empty piece after the last newline is no blank line
    return {"records": len(keys["exact"]), "names": names, "slow": slow, "missing": missing, "blank": blank,
            **{name: values.tobytes() for name, values in keys.items()}}


def _segments(line: bytes) -> tuple[bytes, bytes, bytes, dict | None]:
    """(prompt, answer, tail, record) of one line, as bytes of the canonical line: prompt is
    every turn but the final assistant turn, `{"role":..,"content":..},` each; answer is the
    final assistant content, JSON-escaped; tail the top-level keys after `conversations`.
    A line in another layout is parsed (record is then the parsed line) and re-serialized.
    Raises ValueError for a line that is no record."""
    if line.startswith(_HEAD):
        end = len(line) - 4 if line.endswith(_END_ONLY) else line.find(_END_MORE, _TURNS)
        # the first assistant turn (a short search through the prompt) is the last one when
        # what follows it is a single string: no unescaped quote; else look from the end
        last = line.find(_LAST, _TURNS, end) if end > _TURNS else -1
        if last >= 0:
            answer = line[last + 31:end]
            if b'"' in answer and answer.count(b'"') != answer.count(b'\\"'):
                last = line.rfind(_LAST, last + 31, end)
                answer = line[last + 31:end]
                if last < 0 or (b'"' in answer and answer.count(b'"') != answer.count(b'\\"')):
                    last = -1
            if last >= 0:
                return line[_TURNS:last], answer, line[end + 4:], None
    try:
        record = orjson.loads(line)
        pairs = [(t["role"], t["content"]) for t in record["conversations"]]
    except (orjson.JSONDecodeError, TypeError, KeyError):
        raise ValueError("not a record") from None
    if not pairs or not all(isinstance(r, str) and isinstance(c, str) for r, c in pairs):
        raise ValueError("not a record")
    if pairs[-1][0] == "assistant":
        pairs, answer_text = pairs[:-1], pairs[-1][1]
    else:
        answer_text = ""
    dumps = orjson.dumps
    head = b"".join(b'{"role":%s,"content":%s},' % (dumps(r), dumps(c)) for r, c in pairs)
    return head, dumps(answer_text)[1:-1], b"", record


def _normalize(text: bytes) -> bytes:
    """JSON-escaped text -> its letters and digits, lower-cased."""
    if b"\\" in text:
        text = _ESCAPE(b"", text)
    return text.translate(_LOWER, _NOT_ALNUM) if text.isascii() else _normalize_unicode(text)


def _normalize_unicode(text: bytes) -> bytes:
    """The normalization of text with non-ASCII characters: each character lower-cased, then
    kept only if str.isalnum() accepts it. On ASCII text it is text.translate(_LOWER, _NOT_ALNUM)."""
    text = text.translate(_LOWER, _NOT_ALNUM)
    for char in sorted(set(text.translate(None, _ASCII).decode("utf-8", "ignore"))):
        kept = "".join(c for c in char.lower() if c.isalnum())
        if kept != char:
            text = text.replace(char.encode(), kept.encode())
    return text


def _full_answer_keys(source: Path, offsets: np.ndarray, prompt_keys: np.ndarray) -> np.ndarray:
    """Full answer keys of the lines at these byte offsets (in file order)."""
    keys = np.empty(offsets.size, np.uint64)
    with open(source, "rb") as f:
        for i, (offset, prompt_key) in enumerate(zip(offsets.tolist(), prompt_keys.tolist())):
            f.seek(offset)
            answer = _segments(f.readline().rstrip(b"\n"))[1]
            keys[i] = xxhash.xxh3_64_intdigest(_normalize(answer), prompt_key) or 1
    return keys


def _line_number(path: str, offset: int) -> int:
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


def _field_from_tail(rest: bytes, key: str) -> bytes | None:
    """A stratify field from the top-level keys after `conversations` (canonical layout)."""
    try:
        return _field_from_record(orjson.loads(b"{" + rest), key)
    except orjson.JSONDecodeError:
        return None


def _field_from_record(record: dict, key: str) -> bytes | None:
    meta = record.get("meta")
    if isinstance(meta, dict) and key in meta:
        value = meta[key]
    elif key in record and key != "conversations":
        value = record[key]
    else:
        return None
    return None if value is None else orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _show(value: bytes, escaped_text: bool) -> str:
    """How a stratum value appears in the metrics: strings as they are, others as JSON."""
    shown = orjson.loads(b'"' + value + b'"' if escaped_text else value)
    shown = shown if isinstance(shown, str) else value.decode()
    return shown if len(shown) <= 200 else shown[:199] + "…"


class _Scan:
    """The keys of all records, in file order, as growing arrays of uint64."""

    FIELDS = ("exact", "prompt", "pre", "full", "offset", "stratum")

    def __init__(self) -> None:
        self.parts: dict[str, array] = {f: array("Q") for f in self.FIELDS}
        self.block_records: list[int] = []
        self.block_blanks: list[int] = []
        self.names: dict[int, str] = {}
        self.records = self.slow = self.missing = 0

    def add(self, part: dict[str, Any]) -> None:
        for f in self.FIELDS:
            self.parts[f].frombytes(part[f])
        self.block_records.append(part["records"])
        self.block_blanks.append(part["blank"])
        self.records += part["records"]
        self.slow += part["slow"]
        self.missing += part["missing"]
        for key, name in part["names"].items():
            if len(self.names) < 50 * MAX_STRATA_SHOWN:
                self.names.setdefault(key, name)

    def array(self, field: str) -> np.ndarray:
        return np.frombuffer(self.parts[field], dtype=np.uint64)

    def normalized_keys(self, among: np.ndarray, source: Path) -> np.ndarray:
        """The normalized-record key of every record, exact among the records `among`:
        where a pre key is unique there, it stands for the record; where it is shared, the
        full key decides (computed now for long answers, once per distinct line)."""
        pre, full, prompt = self.array("pre"), self.array("full").copy(), self.array("prompt")
        _, inverse, count = np.unique(pre[among], return_inverse=True, return_counts=True)
        shared = among[count[inverse.reshape(-1)] > 1]
        todo = shared[full[shared] == 0]
        if todo.size:
            _, first, again = np.unique(self.array("exact")[todo], return_index=True, return_inverse=True)
            computed = _full_answer_keys(source, self.array("offset")[todo[first]], prompt[todo[first]])
            full[todo] = computed[again.reshape(-1)]
        norm = pre.copy()
        norm[shared] = full[shared]
        return norm


# --- 4. assign -------------------------------------------------------------------------


def _assign(group_keys: np.ndarray, group_size: np.ndarray, group_stratum: np.ndarray,
            ratios: tuple[float, float, float], strata: int) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) per group.

    Groups are laid out stratum after stratum, each stratum in key order, and each split
    takes a contiguous run of its stratum: a group goes to the split whose run holds its
    midpoint. Per-stratum run lengths come from one apportionment sequence over all records
    (Sainte-Lague order of seats), so the totals match the ratios as closely as whole
    numbers allow (100 records at 0.8/0.1/0.1 give exactly 80/10/10), each stratum keeps
    the ratios to within a record per split, and many small strata still spread over
    all splits.
    """
    order = np.lexsort((group_keys, group_stratum))
    size = group_size[order].astype(np.int64)
    stratum = group_stratum[order]
    end = np.cumsum(size)
    twice_mid = 2 * end - size
    total = int(end[-1]) if end.size else 0

    stratum_records = np.bincount(stratum, weights=size, minlength=strata).astype(np.int64)
    stratum_end = np.cumsum(stratum_records)
    stratum_start = stratum_end - stratum_records
    seats = _seat_sequence(total, ratios)
    # seats of each split among the first x records, at every stratum boundary
    won = [np.searchsorted(np.flatnonzero(seats == k), stratum_end) -
           np.searchsorted(np.flatnonzero(seats == k), stratum_start) for k in range(3)]
    first_cut = stratum_start + won[0]
    second_cut = first_cut + won[1]
    split = ((twice_mid >= 2 * first_cut[stratum]).astype(np.int8) +
             (twice_mid >= 2 * second_cut[stratum]).astype(np.int8))
    result = np.empty_like(split)
    result[order] = split
    return result


def _seat_sequence(n: int, ratios: tuple[float, float, float]) -> np.ndarray:
    """Which split wins each of n seats in Sainte-Lague order: split k's c-th seat comes at
    (c - 0.5) / ratio_k; ties go to the earlier split. Every prefix is proportional to
    within about one seat per split."""
    priorities, owners = [], []
    for k, r in enumerate(ratios):
        if r > 0:
            m = int(math.ceil(r * n)) + 3
            priorities.append((np.arange(m, dtype=np.float64) + 0.5) / r)
            owners.append(np.full(m, k, np.int8))
    order = np.argsort(np.concatenate(priorities), kind="stable")[:n]
    return np.concatenate(owners)[order]


def _fill_empty_splits(group_split: np.ndarray, group_size: np.ndarray, ratios: tuple[float, float, float],
                       kept: int, groups: int) -> np.ndarray:
    """A split with a non-zero ratio that got no group (few records, or big groups) takes the
    smallest group of the split with the most groups."""
    group_split = group_split.copy()
    for k in range(3):
        if ratios[k] <= 0 or np.any(group_split == k):
            continue
        per_split = np.bincount(group_split, minlength=3)
        donor = int(np.argmax(per_split))
        if per_split[donor] < 2:
            raise InputError(
                f"{kept} records in {groups} prompt groups cannot give every split with a non-zero ratio a group: "
                f"add records with other prompts, or set data.split.group_by_prompt: false"
            )
        candidates = np.flatnonzero(group_split == donor)
        group_split[candidates[np.argmin(group_size[candidates])]] = k
    return group_split


# --- 5. write --------------------------------------------------------------------------


def _write(source: Path, blocks: list[tuple[int, int]], scan: _Scan, record_split: np.ndarray,
           ws, progress) -> dict[str, dict[str, Any]]:
    """Copy each kept line, unchanged, to its split's file, in input order.

    Consecutive lines bound for one split are copied as one slice of the block (their
    offsets are known from the scan). A helper thread does the file writes and SHA-256
    updates (both release the GIL) while this thread reads the next block; at most two
    blocks are in memory.
    """
    outputs = [AtomicOutput(ws.split_file(name)) for name in SPLITS]
    offsets = scan.array("offset")
    position = 0
    pending: list[Future] = []
    with outputs[0], outputs[1], outputs[2], open(source, "rb") as f, ThreadPoolExecutor(1) as writer:
        for (start, end), count, blank in zip(blocks, scan.block_records, scan.block_blanks):
            f.seek(start)
            data = f.read(end - start)
            which = record_split[position:position + count]
            pieces = _cut(data, which, offsets[position:position + count].astype(np.int64) - start, blank)
            position += count
            for done in pending:
                done.result()
            pending = [writer.submit(outputs[k].write, piece) for k, piece in enumerate(pieces) if piece]
            progress.advance(int(np.count_nonzero(which >= 0)))
        for done in pending:
            done.result()
    return {name: {"path": ws.rel(out.path), "records": 0, "sha256": out.sha256.hexdigest()}
            for name, out in zip(SPLITS, outputs)}


def _cut(data: bytes, which: np.ndarray, starts: np.ndarray, blank: int) -> list[bytes]:
    """The bytes of one block for each split: its lines whose entry in `which` is 0, 1, 2."""
    if not which.size:
        return [b"", b"", b""]
    if blank or not data.endswith(b"\n"):  # rare: go line by line
        lines = [line for line in data.split(b"\n") if line]
        return [b"".join(line + b"\n" for line in compress(lines, (which == k).tobytes())) for k in range(3)]
    # runs of equal entries: [run_start, run_end) in records, then in bytes
    change = np.flatnonzero(which[1:] != which[:-1]) + 1
    run_first = np.concatenate(([0], change))
    byte_end = np.concatenate((starts[change], [len(data)]))
    pieces: list[list[memoryview]] = [[], [], []]
    view = memoryview(data)
    for k, a, b in zip(which[run_first].tolist(), starts[run_first].tolist(), byte_end.tolist()):
        if k >= 0:
            pieces[k].append(view[a:b])
    return [b"".join(p) for p in pieces]


# --- 6. check --------------------------------------------------------------------------


def _shared_between_splits(keys: np.ndarray, split: np.ndarray) -> dict[tuple[str, str], int]:
    """For each pair of splits, how many distinct keys occur in both.

    One sort of (key, split) packed in 64 bits (the key's two low bits give way to the
    split), then the set of splits of each distinct key as a bit mask.
    """
    packed = np.sort((keys & ~np.uint64(3)) | split.astype(np.uint64))
    key = packed >> np.uint64(2)
    starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1]))) if key.size else np.zeros(0, np.int64)
    bits = np.left_shift(np.uint8(1), (packed & np.uint64(3)).astype(np.uint8))
    masks = np.bitwise_or.reduceat(bits, starts) if starts.size else bits
    result = {}
    for a, b in PAIRS:
        both = np.uint8((1 << SPLITS.index(a)) | (1 << SPLITS.index(b)))
        result[(a, b)] = int(np.count_nonzero((masks & both) == both))
    return result


def _strata(record_split: np.ndarray, keep: np.ndarray, scan: _Scan, values: np.ndarray) -> dict[str, dict[str, int]]:
    stratum_hash = scan.array("stratum")
    kept_split = record_split[keep]
    _, stratum_of, totals = np.unique(stratum_hash[keep], return_inverse=True, return_counts=True)
    stratum_of = stratum_of.reshape(-1)
    shown = np.argsort(-totals, kind="stable")[:MAX_STRATA_SHOWN]
    table = {name: {} for name in SPLITS}
    for k, name in enumerate(SPLITS):
        per_value = np.bincount(stratum_of[kept_split == k], minlength=values.size)
        for v in shown:
            key = int(values[v])
            label = scan.names.get(key, f"#{key:016x}")
            table[name][label] = int(per_value[v])
    return table
