"""split: de-duplicate data/formatted/all.jsonl and divide it into train, val and test so that
no test question was seen in training, then measure that from the written files.

Reads top to bottom:

1. scan     stream all.jsonl in blocks (worker processes for big files); per record keep
            8-byte keys in flat arrays, never the record: the exact line, the normalized
            prompt (every turn but a last answer), each normalized user turn, LSH band keys
            of the user turns' MinHash signatures (near-duplicates), benchmark matches
            (data.decontaminate), the stratum, and the line's offset and length
2. dedup    drop exact, then normalized duplicates (the first occurrence is kept: only records
            sharing a normalized prompt can be one, and only their answers are normalized,
            in the scan when the prompt is shared within a block, else read back), then with
            dedup.near: drop, records whose user turn near-duplicates an earlier kept one
3. group    connected components over every shared key: a user turn, the prompt, the
            normalized record, a near-duplicate user turn; a component goes to one split
4. assign   order components by a seeded hash (a component's smallest record key), fill
            train/val/test by cumulative record counts, per stratum when
            `data.split.stratify` is set
5. decontaminate   leave contaminated train records out (or only count them)
6. write    copy each kept line unchanged into its split file (worker processes, a block at a
            time, each piece at its place in its file); every dropped record goes to
            data/formatted/duplicates.jsonl or contaminated.jsonl with the record it matched
7. check    re-read the three split files (each piece as soon as it is written) and measure
            leakage on its own: normalized user turns found in two splits, and
            near-duplicate user turns across splits
8. account  every record of all.jsonl is in a split or in one of the dropped counts

Normalization (factory.textsim.normalize): Unicode NFKC, case folded, whitespace runs made
one space; symbols, punctuation and digits are kept.

Memory: about 70 bytes a record plus, with near-duplicates on, 152 bytes per distinct user
turn of at least `dedup.ngram` words (LSH band keys 72, a signature sketch 64, record and
key), plus two blocks per worker; LSH candidates are filtered band by band as found, and
the ones kept are measured exactly (textsim.pair_jaccard, numpy arrays, no Python set per
text) on their word n-gram hashes, which the scan's and the check's workers compute for the
signatures and this process writes to an unnamed temporary file as they come (SpilledNgrams:
on disk, not in memory) and reads back by row.

Speed: a block's records are parsed with simdjson (Python strings only for the turns read),
then handled together: all prompt texts normalized at once (textsim.normalize_batch), prompt
keys combined from the turn keys in numpy, MinHash for a block's distinct user turns in one
batch. Answers, most of the text, are normalized only where two records share a prompt.
"""

from __future__ import annotations

import importlib
import math
import os
import shutil
import tempfile
import threading
import time
from array import array
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import cached_property
from itertools import compress
from pathlib import Path
from typing import Any, Callable, Iterator

import orjson
import xxhash

# numpy and factory.textsim are imported in the functions that use them: a `factory run` with
# nothing to do imports this module for its PHASE only, and should not pay for numpy.
from factory.errors import InputError
from factory.io import AtomicOutput, drop_in_background
from factory.phase import Phase, PhaseContext
from factory.workers import default_workers, without_huge_pages, worker_pool

SPLITS = ("train", "val", "test")
PAIRS = (("train", "val"), ("train", "test"), ("val", "test"))

CHUNK_BYTES = 1 << 20
"""The scan and the check work on line-aligned blocks of about this size."""

WRITE_BLOCKS = 2
"""The write works on this many of the scan's blocks at a time."""

MAX_STRATA_SHOWN = 100
"""Metrics list per-split counts for at most this many stratum values (the most frequent)."""

EXAMPLES = 5
"""Example pairs per kind in the metrics (leakage, near-duplicates, contamination)."""

SHOWN_CHARS = 200
NEAR_REPAIRS = 10
"""Rounds of the search for near-duplicate pairs left in two splits after assignment (_repair)."""
MOST_SHARED = 5
KEYED_LINES = 1 << 16
"""The check looks up the user turns of a split file's keyed lines (_KnownLines) this many
lines at a time: a lookup's cost is mostly per call, and a part holds about a thousand."""
BOILERPLATE_RECORDS = 10
"""A benchmark n-gram found in this many benchmark records or more is template text, not a
test item, and is not matched."""

MISSING = "(missing)"
_U64 = (1 << 64) - 1
_MIX_TEXT, _MIX_ROLE, _MIX_POSITION = 0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9
EXACT, NORMALIZED, NEAR = 1, 2, 3
KINDS = {EXACT: "exact", NORMALIZED: "normalized", NEAR: "near"}


def run(ctx: PhaseContext) -> dict[str, Any]:
    return split_records(ctx)


def split_records(ctx: PhaseContext, workers: int | None = None, chunk_bytes: int = CHUNK_BYTES) -> dict[str, Any]:
    with ExitStack() as stack, without_huge_pages():
        return _split(ctx, workers, chunk_bytes, stack)


def _split(ctx: PhaseContext, workers: int | None, chunk_bytes: int, stack: ExitStack) -> dict[str, Any]:
    import numpy as np
    from factory import textsim

    laps = _Laps()
    data, ws, log = ctx.config.data, ctx.workspace, ctx.log
    cfg = data.split
    ratios = (cfg.train, cfg.val, cfg.test)
    source = ws.formatted_file
    if not source.is_file():
        raise InputError(f"{ws.rel(source)} not found: run `factory run format` first to create it from data/raw")
    if workers is None:
        workers = default_workers(source.stat().st_size, data.workers)
    benchmarks = _load_benchmarks(data.decontaminate, ws, cfg.seed & _U64) if data.decontaminate.benchmarks else None
    settings = Settings(seed=cfg.seed & _U64, stratify=cfg.stratify, min_turn_words=cfg.min_turn_words,
                        ngram=data.dedup.ngram, near=data.dedup.near != "off", threshold=data.dedup.near_threshold,
                        benchmarks=benchmarks)
    textsim.prepare(settings.threshold)  # before the workers fork: they inherit it
    laps("benchmarks")

    pool = stack.enter_context(worker_pool(workers, log, "split", _init_worker, (settings,)))
    # scipy's graph routines, first needed by the dedup step, where this process is the one
    # busy (0.17 s to import), are imported beside the scan's workers (after their fork)
    threading.Thread(target=importlib.import_module, args=("scipy.sparse.csgraph",), daemon=True).start()

    # 1. scan -------------------------------------------------------------------------
    blocks = _blocks(source, chunk_bytes)
    ctx.progress.start(None, "records scanned")
    spilled = stack.enter_context(SpilledNgrams(ws.formatted_dir))
    scan = _Scan(textsim.lsh_params(settings.threshold)[0], spilled)
    handover = stack.enter_context(_handover_folder(ws))
    jobs = [(str(source), a, b, str(handover / f"{a}.bin") if pool is not None else None) for a, b in blocks]
    for part in _map_blocks(_scan_block, jobs, settings, workers, log, pool):
        scan.add(_taken_over(part))
        ctx.progress.advance(part["records"])
    scan.finish()
    n = scan.records
    log.info("split: scanned %d records", n)
    laps("scan")

    # 2. dedup ------------------------------------------------------------------------
    # the last split files go while this process searches with a core to spare (_write waits)
    dropping = drop_in_background([ws.split_file(name) for name in SPLITS])
    duplicate_of = np.full(n, -1, np.int64)
    kind = np.zeros(n, np.int8)
    if data.dedup.exact:
        _mark_duplicates(scan.exact, np.arange(n), duplicate_of, kind, EXACT)
    # the workers read back answers for the normalized keys while this process searches
    # near-duplicates: the search takes each user text's first record, which is never a
    # normalized duplicate (its original comes earlier, with the same turns)
    normalized_keys = _normalized_keys(scan, np.flatnonzero(kind == 0), source, blocks, settings, workers, log, pool)
    similarity = np.zeros(n)
    near_a = near_b = np.zeros(0, np.int64)
    near_pairs_found = 0
    search = None
    if settings.near:
        search = _NearSearch(scan, kind == 0)
        near_a, near_b, near_j, later_key = _near_record_pairs(scan, search, settings, linking=data.dedup.near == "group")
        near_pairs_found = int(near_a.size)
    norm = normalized_keys()
    del normalized_keys
    if data.dedup.normalized:
        _mark_duplicates(norm, np.flatnonzero(kind == 0), duplicate_of, kind, NORMALIZED)
    if settings.near:
        if data.dedup.near == "drop":
            _drop_near(scan, near_a, near_b, near_j, later_key, duplicate_of, kind, similarity)
            both = (kind[near_a] == 0) & (kind[near_b] == 0)
            near_a, near_b = near_a[both], near_b[both]
    keep = np.flatnonzero(kind == 0)
    dropped = {name: int(np.count_nonzero(kind == k)) for k, name in KINDS.items()}
    kept = int(keep.size)
    needed = [name for name, r in zip(SPLITS, ratios) if r > 0]
    if kept < len(needed):
        raise InputError(
            f"{kept} record(s) left after de-duplication ({n} read, {dropped['exact']} exact, "
            f"{dropped['normalized']} normalized and {dropped['near']} near duplicates removed), but "
            f"{', '.join(needed)} each need at least one: add data to data/raw, or set the ratio of a split to 0 in data.split"
        )
    laps("dedup")
    # the check's lookup tables, built on the second core while this thread groups and assigns:
    # they depend on the scan and the search alone
    lookups = stack.enter_context(ThreadPoolExecutor(1)).submit(_check_lookups, scan, search, settings)

    # 3. group ------------------------------------------------------------------------
    component = _components(scan, keep, norm, near_a, near_b, cfg.group_by_prompt)
    group_of_kept = component[keep]
    group_count = int(group_of_kept.max()) + 1
    group_size = np.bincount(group_of_kept, minlength=group_count)
    # A component's key: its smallest record key (seeded): a seeded order that does not
    # depend on the input order. Its first record gives its stratum.
    group_keys = np.full(group_count, np.iinfo(np.uint64).max, np.uint64)
    np.minimum.at(group_keys, group_of_kept, norm[keep])
    del norm
    group_first = np.full(group_count, n, np.int64)
    np.minimum.at(group_first, group_of_kept, keep)
    if group_count < len(needed):
        raise InputError(
            f"the {kept} records form only {group_count} group(s) of records sharing a user turn or prompt, "
            f"and each group stays in one split, so {', '.join(needed)} cannot each get one: add records with "
            f"other prompts, raise data.split.min_turn_words, or set data.split.group_by_prompt: false"
        )
    largest = int(group_size.max())
    shared_turns = _most_shared_turns(scan, keep, source, settings.seed) if largest > max(1, kept // 20) else []
    if shared_turns:
        log.warning("split: the largest group holds %d of %d records; the most shared user turns: %s "
                    "(raise data.split.min_turn_words to stop short generic turns from linking conversations)",
                    largest, kept, "; ".join(f"{t['text']!r} x{t['records']}" for t in shared_turns))
    laps("group")

    # 4. assign -----------------------------------------------------------------------
    if cfg.stratify:
        if scan.missing == n:
            raise InputError(
                f"data.split.stratify: {cfg.stratify!r} is in no record: use `assistant` (the last "
                f"assistant turn) or a key of the records' `meta`; to keep a field of the source records "
                f"there, name it in its input's `meta`, e.g. data.inputs: [{{path: data/raw, meta: [{cfg.stratify}]}}]"
            )
        if scan.missing:
            log.warning("split: %d of %d records have no %r; they form the stratum %r",
                        scan.missing, n, cfg.stratify, MISSING)
        values, inverse = np.unique(scan.stratum[keep], return_inverse=True)
        stratum_of = np.zeros(n, np.int64)
        stratum_of[keep] = inverse.reshape(-1)
        group_stratum = stratum_of[group_first]
    else:
        values, group_stratum = np.zeros(1, np.uint64), np.zeros(group_count, np.int64)
    group_split = _assign(group_keys, group_size, group_stratum, ratios, int(values.size))
    group_split = _fill_empty_splits(group_split, group_size, ratios, kept, group_count)
    record_split = np.full(n, -1, np.int8)
    record_split[keep] = group_split[group_of_kept]
    near_repaired = 0
    if search is not None and search.large_buckets:
        near_repaired = _repair(scan, search, settings, component, group_size, group_split, record_split)
        if near_repaired:
            group_count = int(np.unique(component[keep]).size)
            largest = int(np.bincount(component[keep]).max())
            log.info("split: %d near-duplicate pairs in two splits after assignment, found as the check looks for "
                     "them: their groups joined the split of the largest one", near_repaired)
    signed, known = lookups.result()
    del search, lookups
    laps("assign")

    # 5. decontaminate ----------------------------------------------------------------
    contamination = None
    removed = np.zeros(0, np.int64)
    if benchmarks is not None:
        live = record_split[scan.hit_record] >= 0
        hit, kinds, owners = scan.hit_record[live], scan.hit_kind[live], scan.hit_benchmark[live]
        where = record_split[hit].copy()
        if data.decontaminate.action == "remove":
            removed = hit[where == 0]
            record_split[removed] = -1
        contamination = _contamination_metrics(scan, hit, where, kinds, owners, benchmarks, data.decontaminate,
                                               source, int(removed.size))
        if contamination["found"]["train"]:
            log.warning("split: %d train records match benchmark prompts (%s)", contamination["found"]["train"],
                        "removed" if data.decontaminate.action == "remove" else "kept: decontaminate.action is report")
    laps("decontaminate")

    # 6. write, and 7. check -------------------------------------------------------------
    # The check reads each part of a split file back as soon as it is written: the workers
    # measure while this process writes the rest.
    counts = {name: int(np.count_nonzero(record_split == k)) for k, name in enumerate(SPLITS)}
    ctx.progress.start(int(sum(counts.values())), "records written")
    scan.release(*_Scan.SEARCH_FIELDS)  # the check's keys take their place
    with _LeakageCheck(ws, settings, signed, known) as check:
        del signed, known
        dropping.join()
        files = _write(source, blocks, scan, record_split, ws, ctx.progress, check, pool, log)
        for name in SPLITS:
            files[name]["records"] = counts[name]
        duplicates = _write_duplicates(ws, source, scan, duplicate_of, kind, similarity)
        if benchmarks is not None:
            _write_contaminated(ws, source, scan, hit, where, kinds, owners, benchmarks, data.decontaminate)
        laps("write")

        strata = _strata(record_split, scan, values) if cfg.stratify else None
        del scan
        ctx.progress.start(int(sum(counts.values())), "records checked")
        ctx.progress.advance(sum(check.records.values()))  # checked while written
        leakage = check.result(ctx.progress)
    stack.close()
    if leakage["total"]:
        log.warning("split: %d user turns and %d near-duplicate pairs are shared between splits",
                    leakage["user_turns"], leakage["near_duplicates"])
    laps("check")

    # 8. account ----------------------------------------------------------------------
    accounting = {
        "formatted": n,
        "duplicates_exact": dropped["exact"],
        "duplicates_normalized": dropped["normalized"],
        "near_duplicates_dropped": dropped["near"],
        "decontaminated": int(removed.size),
        "written": int(sum(counts.values())),
        "reread": int(sum(leakage["records"].values())),
    }
    accounting["balanced"] = (
        n == accounting["written"] + dropped["exact"] + dropped["normalized"] + dropped["near"] + removed.size
        and accounting["reread"] == accounting["written"]
        and leakage["records"] == counts
    )
    accounting["equation"] = (f"formatted {n} = written {accounting['written']} + exact {dropped['exact']} "
                              f"+ normalized {dropped['normalized']} + near {dropped['near']} "
                              f"+ decontaminated {removed.size}")

    written = max(1, accounting["written"])
    metrics = {
        "records_in": n,
        "duplicates_exact": dropped["exact"],
        "duplicates_normalized": dropped["normalized"],
        "near_duplicates": {"mode": data.dedup.near, "threshold": settings.threshold, "ngram": settings.ngram,
                            "num_perm": textsim.NUM_PERM, "lsh_bands_rows": list(textsim.lsh_params(settings.threshold))
                            if settings.near else None, "pairs": near_pairs_found, "dropped": dropped["near"],
                            "repaired_after_assignment": near_repaired},
        "duplicates_file": duplicates,
        "records_out": kept,
        "groups": group_count,
        "largest_group": largest,
        "most_shared_user_turns": shared_turns,
        "group_by_prompt": cfg.group_by_prompt,
        "min_turn_words": cfg.min_turn_words,
        "counts": counts,
        "ratios_requested": dict(zip(SPLITS, ratios)),
        "ratios_actual": {name: round(counts[name] / written, 6) for name in SPLITS},
        "seed": cfg.seed,
        "stratify": cfg.stratify,
        "strata": strata,
        "strata_distinct": int(values.size) if cfg.stratify else None,
        "decontamination": contamination or {"benchmarks": [], "found": {name: 0 for name in SPLITS},
                                             "removed": 0, "remaining_in_train": 0},
        "leakage": leakage,
        "accounting": accounting,
        "files": files,
        "seconds": round(sum(laps.seconds.values()), 3),
        "seconds_by_step": laps.seconds,
    }
    log.info("split: %d in, %d exact + %d normalized + %d near duplicates and %d contaminated dropped, %d groups "
             "-> train %d, val %d, test %d", n, dropped["exact"], dropped["normalized"], dropped["near"],
             removed.size, group_count, counts["train"], counts["val"], counts["test"])
    return metrics


def _check_lookups(scan: _Scan, search: _NearSearch | None, settings: Settings
                   ) -> tuple[_Signed | None, _KnownLines | None]:
    """What the check looks up: the texts the search signed (with their n-grams), and the
    user turns of each line the scan read. Without them (no near-duplicate search, or nothing
    long enough to search) it signs and parses every line itself."""
    if search is None or not search.rows.size:
        return None, None
    return _Signed(scan, search, settings), _KnownLines(scan)


def _outputs(cfg, ws) -> list[Path]:
    files = [ws.split_file(name) for name in SPLITS] + [ws.duplicates_file]
    return files + ([ws.contaminated_file] if cfg.data.decontaminate.benchmarks else [])


def _inputs(cfg, ws) -> list[Path]:
    from phases.format import input_location

    return [ws.formatted_file] + [input_location(ws, p, "test") for p in cfg.data.decontaminate.benchmarks]


PHASE = Phase(
    name="split",
    summary="de-duplicate data/formatted/all.jsonl, group records that share a user turn or prompt, "
    "split into train/val/test and measure leakage from the written files",
    metrics="split",
    run=run,
    config_sections=("data",),
    inputs=_inputs,
    outputs=_outputs,
)


@dataclass
class Settings:
    """What every scan and check worker needs (sent once per worker)."""

    seed: int
    stratify: str | None
    min_turn_words: int
    ngram: int
    near: bool
    threshold: float
    benchmarks: "Benchmarks | None" = None

    @property
    def near_min_words(self) -> int:
        return max(self.ngram, self.min_turn_words)


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


_SETTINGS: Settings | None = None


def _init_worker(settings: Settings) -> None:
    global _SETTINGS
    _SETTINGS = settings


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


JOBS_AT_A_TIME = 4
"""Blocks handed to a worker together: each hand-over wakes the pool's feeding thread, which
waits for this process's lock (the GIL) while it adds up results; one block at a time, the
workers waited for work, and the scan and the write each took 0.1-0.15 s longer at 1M records."""


def _map_blocks(function: Callable, jobs: list, settings: Settings, workers: int, log, pool=None) -> Iterator[dict]:
    """function(job) for every job, in order: in the pool's workers, or in this process."""
    if pool is not None and len(jobs) > 1:
        yield from pool.map(function, jobs, chunksize=JOBS_AT_A_TIME)
        return
    if pool is None and workers > 1 and len(jobs) > 1:
        with worker_pool(min(workers, len(jobs)), log, "split", _init_worker, (settings,)) as own:
            yield from own.map(function, jobs)
        return
    _init_worker(settings)
    yield from map(function, jobs)


def _read_block(path: str, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def _conversation(line: bytes, path: str, offset: int) -> None:
    """An InputError naming the line when it is no record (the check of one line, for the message)."""
    try:
        record = orjson.loads(line)
        turns = record["conversations"]
        if not turns or not all(type(t["role"]) is str and type(t["content"]) is str for t in turns):
            raise TypeError
    except (orjson.JSONDecodeError, TypeError, KeyError, AttributeError):
        raise InputError(
            f"{path}, line {_line_number(path, offset)}: not a record with `conversations` (a list of "
            f"{{role, content}} turns); the file is written by `factory run format`: run it again"
        ) from None


def _line_number(path: str, offset: int) -> int:
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


class _Block:
    """The records of one block, parsed at once: per record its file offset, its line in
    the block (0-based) and its number of turns; per turn (all turns flattened in record
    order) its role and its content. With `role`, only the turns of that role are kept."""

    def __init__(self, path: str, data: bytes, start: int, role: str | None = None):
        import numpy as np

        lines, self.offset, self.length, self.line, self.lines = _lines(data, start)
        self.records = len(lines)
        self.raw_lines = lines
        try:
            turns, self.roles, self.contents = _turns(lines, role)
        except Exception:  # anything simdjson does not take: orjson decides, and names the line
            turns, self.roles, self.contents = self._turns_of_parsed(path, start, role)
        self.turns = np.frombuffer(turns, np.int64)
        self.first_turn = np.cumsum(self.turns) - self.turns
        self.record_of_turn = np.repeat(np.arange(self.records), self.turns)

    @cached_property
    def parsed(self) -> list[dict]:
        """The records as dicts (for a stratum: only then is each record built whole)."""
        return list(map(orjson.loads, self.raw_lines))

    def _turns_of_parsed(self, path: str, start: int, role: str | None) -> tuple[array, list, list]:
        try:
            conversations = [record["conversations"] for record in self.parsed]
            if not all(map(len, conversations)):
                raise TypeError
            roles = [turn["role"] for turns in conversations for turn in turns]
            kept = [[turn for turn in turns if role is None or turn["role"] == role] for turns in conversations]
            contents = [turn["content"] for turns in kept for turn in turns]
            if set(map(type, roles)) - {str} or set(map(type, contents)) - {str}:
                raise TypeError
            roles = roles if role is None else [role] * len(contents)
        except (orjson.JSONDecodeError, TypeError, KeyError, AttributeError):
            for line, offset in zip(self.raw_lines, self.offset.tolist()):
                _conversation(line, path, offset)  # raises the InputError that names the line
            raise InputError(f"{path}: the records from byte {start} on are not records with `conversations`; "
                             f"the file is written by `factory run format`: run it again") from None
        return array("q", map(len, kept)), roles, contents

    def role_codes(self, seed: int) -> np.ndarray:
        import numpy as np

        codes = {role: xxhash.xxh3_64_intdigest(role.encode(), seed) for role in set(self.roles)}
        return np.fromiter(map(codes.__getitem__, self.roles), np.uint64, len(self.roles))


def _lines(data: bytes, start: int) -> tuple[list[bytes], np.ndarray, np.ndarray, np.ndarray, int]:
    """The non-empty lines of a block that starts at byte `start` of its file, without their
    newlines; each one's offset in the file, length and line in the block (0-based); the
    block's number of lines (its newlines, and a last line without one)."""
    import numpy as np

    raw = data.split(b"\n")
    length = np.fromiter(map(len, raw), np.int64, len(raw))
    filled = np.flatnonzero(length)
    offset = (start + np.cumsum(length + 1) - length - 1)[filled]
    lines = raw[:-1] if filled.size == len(raw) - 1 and not raw[-1] else [raw[i] for i in filled.tolist()]
    return lines, offset, length[filled], filled, len(raw) - 1 + bool(raw[-1])


def _turns(lines: list[bytes], role: str | None) -> tuple[array, list[str], list[str]]:
    """(turns kept per record, their roles, their contents) of JSON lines that are records
    with `conversations` (every role a string, the contents kept strings): simdjson builds
    Python strings only for what is asked (twice as fast as orjson's whole records; the check
    skips every answer). The lines are parsed as one array (one call instead of one a line),
    which must hold one value per line. Raises on anything else. A key given twice in a record
    would be read first-wins here and last-wins by orjson; `format` writes none."""
    import simdjson

    framed = list(lines) or [b""]  # the brackets on the first and last line: one copy of the block, not three
    framed[0] = b"[" + framed[0]
    framed[-1] += b"]"
    document = simdjson.Parser().parse(b",".join(framed))
    if len(document) != len(lines):  # a line with two values
        raise ValueError
    counts, roles, contents = array("q"), [], []
    for record in document:
        conversation = record["conversations"]
        kept = 0
        for turn in conversation:
            name = turn["role"]
            if type(name) is not str:
                raise TypeError
            if role is None or name == role:
                content = turn["content"]
                if type(content) is not str:
                    raise TypeError
                roles.append(name)
                contents.append(content)
                kept += 1
        if not len(conversation):
            raise TypeError
        counts.append(kept)
    return counts, roles, contents


def _user_turns(texts: list[bytes], key: np.ndarray, record: np.ndarray, settings: Settings, near: bool,
                sign: bool = True) -> dict[str, Any]:
    """Keys of the normalized user turns `texts` (their keys `key`) of at least min_turn_words
    words, each with whether it is long enough to search (`turn_near`), and, with `near`, the
    rows for the near-duplicate search: each distinct one of at least near_min_words words (its
    first occurrence), with (`sign`) its LSH band keys, sketch and n-gram hashes."""
    import numpy as np
    from factory import textsim

    s = settings
    words = textsim.word_counts(texts)
    counted = np.flatnonzero(words >= s.min_turn_words)  # with 0, an empty turn too: it is shared like any other
    result = {"turn_record": record[counted].tobytes(), "turn_key": key[counted].tobytes(),
              "turn_near": (words[counted] >= max(1, s.near_min_words) if near else np.zeros(counted.size, bool)).tobytes(),
              "near_record": b"", "near_key": b"", "near_bands": b"", "near_sketch": b"", "near_ngrams": b"",
              "near_ngram_count": b""}
    if near:
        long_enough = np.flatnonzero(words >= max(1, s.near_min_words))
        rows = long_enough[textsim.first_of_each(key[long_enough])]
        result.update(near_record=record[rows].tobytes(), near_key=key[rows].tobytes())
        if sign:
            hashes, owner = textsim.ngram_hashes([texts[i] for i in rows.tolist()], s.ngram)
            sig = textsim.minhash(hashes, owner, rows.size)
            result.update(near_bands=textsim.band_keys(sig, *textsim.lsh_params(s.threshold)).tobytes(),
                          near_sketch=textsim.sketch(sig).tobytes(), near_ngrams=hashes.tobytes(),
                          near_ngram_count=np.bincount(owner, minlength=rows.size).tobytes())
    return result


def _turn_shares(keys: np.ndarray, roles: np.ndarray, position: np.ndarray) -> np.ndarray:
    """Each turn's share of its record's key: its normalized text key, role and position
    in the record (0-based) mixed. A record's key is _record_keys of its turns' sum."""
    import numpy as np
    from factory import textsim

    mix_text, mix_role, mix_position = (np.uint64(c) for c in (_MIX_TEXT, _MIX_ROLE, _MIX_POSITION))
    with np.errstate(over="ignore"):
        return textsim.fmix64(keys * mix_text + roles * mix_role + (position.astype(np.uint64) + np.uint64(1)) * mix_position)


def _record_keys(sums: np.ndarray) -> np.ndarray:
    """Record keys (never 0) from the sums of their turns' shares (modulo 2^64)."""
    from factory import textsim

    keys = textsim.fmix64(sums)
    keys[keys == 0] = 1
    return keys


def _scan_block(job: tuple[str, int, int, str | None]) -> dict[str, Any]:
    """Keys for every record of one block. Runs in a worker process for large files, which
    hands its large fields over through a file (_handed_over)."""
    import numpy as np
    from factory import textsim

    path, start, end, handover = job
    s = _SETTINGS
    data = _read_block(path, start, end)
    h = xxhash.xxh3_64_intdigest
    seed, stratify = s.seed, s.stratify
    block = _Block(path, data, start)
    n = block.records
    roles = block.role_codes(seed)
    assistant = h(b"assistant", seed)
    last = block.first_turn + block.turns - 1
    answered = roles[last] == assistant if n else np.zeros(0, bool)
    in_prompt = np.ones(roles.size, bool)
    in_prompt[last[answered]] = False
    # the answers are normalized only for a benchmark search, or where another record of the
    # block has the same prompt (a prompt's answers usually sit together): a record's
    # normalized key is otherwise computed later, and only where its prompt is shared
    # (_normalized_keys)
    texts = [b""] * roles.size
    normalized = np.flatnonzero(in_prompt) if s.benchmarks is None else np.arange(roles.size)
    for i, text in zip(normalized.tolist(), textsim.normalize_batch([block.contents[i] for i in normalized.tolist()])):
        texts[i] = text
    turn_key = textsim.text_keys(texts, seed)
    shares = _turn_shares(turn_key, roles, np.arange(roles.size) - np.repeat(block.first_turn, block.turns))
    shares[~in_prompt] = 0
    prompt_sum = np.add.reduceat(shares, block.first_turn) if n else np.zeros(0, np.uint64)
    prompt = _record_keys(prompt_sum)
    prompt[block.turns - answered == 0] = 0
    norm = np.where(answered, np.uint64(0), prompt)  # 0: not known yet; an unanswered record's is its prompt's
    _, inverse, counts = np.unique(prompt, return_inverse=True, return_counts=True)
    here = np.flatnonzero(answered & (counts[inverse.reshape(-1)] > 1))
    if here.size:
        answers = last[here]
        keys = (turn_key[answers] if s.benchmarks is not None
                else textsim.text_keys(textsim.normalize_batch([block.contents[i] for i in answers.tolist()]), seed))
        norm[here] = _record_keys(prompt_sum[here] + _turn_shares(keys, roles[answers], block.turns[here] - 1))
    user = np.flatnonzero(roles == h(b"user", seed))
    part = {"records": n, "lines": block.lines, "blank": block.lines - n,
            "exact": textsim.text_keys(block.raw_lines, seed).tobytes(), "prompt": prompt.tobytes(),
            "prompt_sum": prompt_sum.tobytes(), "norm": norm.tobytes(), "offset": block.offset.tobytes(),
            "length": block.length.tobytes(), "line": block.line.tobytes()}
    part.update(_user_turns([texts[i] for i in user.tolist()], turn_key[user], block.record_of_turn[user], s, s.near))
    names: dict[int, str] = {}
    missing = 0
    stratum = array("Q")
    if stratify:
        for record in block.parsed:
            value = _stratum_value(record, stratify)
            if value is None:
                missing += 1
                key = 0
            else:
                key = h(value, 1) or 1
            stratum.append(key)
            if key not in names and len(names) < 4 * MAX_STRATA_SHOWN:
                names[key] = MISSING if value is None else _show(value)
    else:
        stratum = array("Q", bytes(8 * n))
    part.update(names=names, missing=missing, stratum=stratum.tobytes())
    if s.benchmarks is not None:
        bench_texts: list[bytes] = []
        bench_owner = array("q")
        bench_exact = array("q"), array("Q")
        is_user = roles == h(b"user", seed)
        for i, (a, count, answer) in enumerate(zip(block.first_turn.tolist(), block.turns.tolist(), answered.tolist())):
            turns = texts[a:a + count]
            exact = [b"\n".join(turns[:count - answer])] + [t for t, u in zip(turns, is_user[a:a + count]) if u]
            for text in exact:
                bench_exact[0].append(i)
                bench_exact[1].append(textsim.text_key(text, seed))
            bench_texts += turns
            bench_owner.extend([i] * count)
        part.update(s.benchmarks.match(bench_texts, np.frombuffer(bench_owner, np.int64),
                                       np.frombuffer(bench_exact[0], np.int64), np.frombuffer(bench_exact[1], np.uint64)))
    return _handed_over(part, handover) if handover else part


@contextmanager
def _handover_folder(ws) -> Iterator[Path]:
    """Where the scan's workers put their results for this process (_handed_over), removed
    when the split ends however it ends."""
    folder = ws.formatted_dir / ".scan.partial"
    shutil.rmtree(folder, ignore_errors=True)  # a killed run's
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _handed_over(part: dict[str, Any], path: str) -> dict[str, Any]:
    """`part` with its byte strings moved into a file at `path` (for _taken_over). The scan's
    results are 313 bytes a record: through the pool's pipe (pickled, written and read 64 KB
    at a time, with a wake-up each) they cost 0.4-0.6 s more CPU at 1M records than written
    to the page cache and read back."""
    fields = [name for name, value in part.items() if type(value) is bytes]
    with open(path, "wb") as f:
        f.writelines(part[name] for name in fields)
    part["handed_over"] = (path, [(name, len(part.pop(name))) for name in fields])
    return part


def _taken_over(part: dict[str, Any]) -> dict[str, Any]:
    """`part` as the worker made it, its fields read back from the file _handed_over wrote (then removed)."""
    if "handed_over" not in part:
        return part
    path, fields = part.pop("handed_over")
    with open(path, "rb") as f:
        data = memoryview(f.read())
    os.unlink(path)
    at = 0
    for name, size in fields:
        part[name] = data[at:at + size]
        at += size
    return part


def _stratum_value(record: dict, key: str) -> bytes | None:
    if key == "assistant":
        last = record["conversations"][-1]
        return orjson.dumps(last["content"]) if last["role"] == "assistant" and last["content"] else None
    return _field_from_record(record, key)


class _Scan:
    """The keys of all records, in file order, each field grown in place as blocks come in (a
    large array grows by remapping its pages, not by a copy: no second copy at the end)."""

    FIELDS = ("exact", "prompt", "prompt_sum", "norm", "offset", "length", "line", "stratum")
    TURN_FIELDS = {"turn_record": "q", "turn_key": "Q", "turn_near": "b", "near_record": "q", "near_key": "Q",
                   "near_bands": "Q", "near_sketch": "B", "hit_record": "q", "hit_kind": "b", "hit_benchmark": "q"}
    SEARCH_FIELDS = ("exact", "prompt", "prompt_sum", "norm", "turn_record", "turn_key", "turn_near", "near_record",
                     "near_key")
    """The keys for de-duplication and grouping, not needed once records are assigned (the
    near-duplicate search lets go of near_bands and near_sketch itself)."""

    def __init__(self, bands: int, ngrams: "SpilledNgrams") -> None:
        self.bands = bands
        self.ngrams = ngrams  # the n-gram hashes of each near_* row
        self.parts: dict[str, array] = {f: array("Q") for f in self.FIELDS}
        self.parts.update({f: array(code) for f, code in self.TURN_FIELDS.items()})
        self.block_records: list[int] = []
        self.block_blanks: list[int] = []
        self.names: dict[int, str] = {}
        self.records = self.missing = self.lines = 0

    def add(self, part: dict[str, Any]) -> None:
        import numpy as np

        base = self.records
        for f in self.FIELDS:
            self.parts[f].frombytes(part[f])
        lines = np.frombuffer(self.parts["line"], np.uint64)
        lines[base:] += np.uint64(self.lines + 1)  # 1-based line numbers in the whole file
        del lines  # an array cannot grow while numpy holds its buffer
        self.lines += part["lines"]
        for f in self.TURN_FIELDS:
            if f in part:  # record numbers from the block's to the file's
                values = (np.frombuffer(part[f], np.int64) + base).tobytes() if f.endswith("_record") else part[f]
                self.parts[f].frombytes(values)
        self.ngrams.add(part["near_ngrams"], part["near_ngram_count"])
        self.block_records.append(part["records"])
        self.block_blanks.append(part["blank"])
        self.records += part["records"]
        self.missing += part["missing"]
        for key, name in part["names"].items():
            if len(self.names) < 50 * MAX_STRATA_SHOWN:
                self.names.setdefault(key, name)

    def release(self, *fields: str) -> None:
        """Let go of fields no longer needed (their memory is returned at once)."""
        for f in fields:
            delattr(self, f)
            del self.parts[f]

    def finish(self) -> None:
        import numpy as np
        from factory import textsim

        for f, values in self.parts.items():
            setattr(self, f, np.frombuffer(values, np.dtype(values.typecode)))
        self.near_bands = self.near_bands.reshape(-1, self.bands)
        self.near_sketch = self.near_sketch.reshape(-1, textsim.NUM_PERM)


class SpilledNgrams:
    """The word n-gram hashes of each near-duplicate candidate (a distinct normalized user
    turn), in an unnamed temporary file beside the data (gone when closed, or when the
    process ends however it ends), appended a block at a time as the workers computed them
    (for the MinHash signatures) and read back by row number. Candidates are measured
    exactly on them: a few rows out of many, long after their block was scanned. Kept here
    they cost no memory (the page cache holds them), and reading one back is a slice, where
    the text cost reading, splitting into words and hashing again in this process."""

    WINDOW = 1 << 24
    """Rows asked for together are gathered from maps of about this many bytes of the file."""

    def __init__(self, folder: Path) -> None:
        self.file = tempfile.TemporaryFile(dir=folder)
        self.ends = array("q")  # where each row's hashes end (in hashes)

    def __enter__(self) -> "SpilledNgrams":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()

    def add(self, hashes: bytes, counts: bytes) -> None:
        """Rows with these n-gram hashes (uint64, concatenated), this many each (int64)."""
        import numpy as np

        size = self.ends[-1] if self.ends else 0
        self.file.seek(8 * size)
        self.file.write(hashes)
        self.ends.frombytes((np.cumsum(np.frombuffer(counts, np.int64)) + size).tobytes())

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The n-gram hashes of these rows, row after row in this order, and for each hash
        the index in `rows` of its row (as textsim.ngram_hashes gives them). Gathered in file
        order from maps of the file a window at a time: only the pages of these rows are
        touched, and only their hashes copied (read a window at a time, every row of the
        window was copied), and no more than a window of the file is mapped at once."""
        import mmap

        import numpy as np
        from factory.textsim import index_ranges

        ends = np.frombuffer(self.ends, np.int64)
        end = ends[rows]
        start = np.where(rows > 0, ends[rows - 1], 0)
        length = end - start
        placed = np.cumsum(length) - length  # where each row's hashes go in the result
        hashes = np.empty(int(length.sum()), np.uint64)
        order = np.argsort(start, kind="stable")
        in_order = start[order]
        self.file.flush()
        i = 0
        while i < rows.size:
            low = 8 * int(in_order[i]) // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY  # in bytes
            j = max(i + 1, int(np.searchsorted(in_order, (low + self.WINDOW) // 8)))
            chunk = order[i:j]
            high = 8 * int(end[chunk].max())
            if high > low:  # else only rows without n-grams
                with mmap.mmap(self.file.fileno(), high - low, access=mmap.ACCESS_READ, offset=low) as mapped:
                    data = np.frombuffer(mapped, np.uint64)
                    hashes[index_ranges(placed[chunk], length[chunk])] = \
                        data[index_ranges(start[chunk] - low // 8, length[chunk])]
                    del data  # a map cannot close while numpy holds it
            i = j
        return hashes, np.repeat(np.arange(rows.size), length)


# --- 2. dedup --------------------------------------------------------------------------


def _mark_duplicates(keys: np.ndarray, among: np.ndarray, duplicate_of: np.ndarray, kind: np.ndarray, code: int) -> None:
    """Among the records `among` (in file order), each one whose key an earlier one has is
    marked a duplicate of the first record with that key."""
    from factory import textsim

    among = among[textsim.maybe_shared(keys[among])]  # a key no other record has marks nothing
    first, inverse = textsim.first_occurrences(keys[among], inverse=True)
    original = among[first[inverse]]
    repeated = original != among
    duplicate_of[among[repeated]] = original[repeated]
    kind[among[repeated]] = code


def _normalized_keys(scan: _Scan, among: np.ndarray, source: Path, blocks: list[tuple[int, int]], settings: Settings,
                     workers: int, log, pool) -> Callable[[], np.ndarray]:
    """A key per record that is equal for two of `among` exactly when their turns are equal
    once normalized (roles, order and normalized texts). Two records can be equal so only
    when their prompts (every turn but a last answer, normalized) are: the records of `among`
    whose prompt another one has get their normalized-record key (the scan's, or their
    answers read back and normalized in the workers); every other record keeps its exact key.
    Answers are most of the text and most prompts are distinct, so the scan normalizes
    answers only for prompts shared within a block. Returns at once, the pool's workers at
    work: the function returned gives the keys."""
    import numpy as np
    from factory import textsim

    # whether the scan has a record's normalized key depends on its block (a prompt shared in
    # it), so a record whose prompt no other one has keeps its exact key, whatever the blocks
    keys = scan.exact.copy()
    maybe = among[textsim.maybe_shared(scan.prompt[among])]
    _, inverse, counts = np.unique(scan.prompt[maybe], return_inverse=True, return_counts=True)
    sharing = maybe[counts[inverse.reshape(-1)] > 1]
    keys[sharing] = scan.norm[sharing]
    shared = sharing[scan.norm[sharing] == 0]
    block_of = np.searchsorted(np.cumsum(scan.block_records), shared, side="right")
    cuts = np.flatnonzero(np.diff(block_of)) + 1
    jobs = [(str(source), *blocks[int(block_of[rows[0]])], scan.offset[shared[rows]].tobytes(),
             scan.prompt_sum[shared[rows]].tobytes()) for rows in np.split(np.arange(shared.size), cuts) if rows.size]
    found = (pool.map(_normalized_record_keys, jobs) if pool is not None
             else _map_blocks(_normalized_record_keys, jobs, settings, workers, log))

    def result() -> np.ndarray:
        keys[shared] = np.frombuffer(b"".join(found), np.uint64)
        return keys

    return result


def _normalized_record_keys(job: tuple[str, int, int, bytes, bytes]) -> bytes:
    """The normalized-record keys (uint64) of the records at these file offsets in the block
    [start, end), given the sums of their prompts' turn shares: a last answer's share is added."""
    import numpy as np
    import simdjson
    from factory import textsim

    path, start, end, offsets, prompt_sums = job
    seed = _SETTINGS.seed
    data = _read_block(path, start, end)
    lines = []
    for offset in np.frombuffer(offsets, np.uint64).tolist():
        stop = data.find(b"\n", offset - start)
        lines.append(data[offset - start:stop if stop >= 0 else len(data)])
    answers, position = [], []  # the scan read these lines: each is a record with turns
    for record in simdjson.Parser().parse(b"[" + b",".join(lines) + b"]"):
        turns = record["conversations"]
        last = turns[-1]
        answered = last["role"] == "assistant"
        answers.append(last["content"] if answered else "")
        position.append(len(turns) - 1 if answered else -1)
    position = np.array(position, np.int64)
    sums = np.frombuffer(prompt_sums, np.uint64).copy()
    answer = np.flatnonzero(position >= 0)
    texts = textsim.normalize_batch([answers[i] for i in answer.tolist()])
    roles = np.full(answer.size, xxhash.xxh3_64_intdigest(b"assistant", seed), np.uint64)
    sums[answer] += _turn_shares(textsim.text_keys(texts, seed), roles, position[answer])
    return _record_keys(sums).tobytes()


class _NearSearch:
    """The rows of the scan's near_* fields that the near-duplicate searches look at: each user
    text's first occurrence among the live records, in file order, with their band keys and
    sketches (the scan lets go of its own: 100 MB at 1M records)."""

    def __init__(self, scan: _Scan, alive: np.ndarray) -> None:
        import numpy as np
        from factory import textsim

        rows = np.flatnonzero(alive[scan.near_record])
        self.rows = rows[textsim.first_of_each(scan.near_key[rows])]
        self.bands, self.sketches = scan.near_bands[self.rows], scan.near_sketch[self.rows]
        scan.release("near_bands", "near_sketch")
        self.large_buckets: list[np.ndarray] = []  # rows of the buckets too large for all their pairs


def _near_record_pairs(scan: _Scan, search: _NearSearch, settings: Settings, linking: bool
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Record pairs (a < b) with near-duplicate user turns (different texts), among the live
    records, with their similarity and the key of b's user turn; each user text is searched
    once (its first occurrence). With `linking` (dedup.near: group), only the pairs that join
    groups (textsim.near_duplicate_pairs)."""
    import numpy as np
    from factory import textsim

    rows = search.rows
    low, high, similarity = textsim.near_duplicate_pairs(search.bands, search.sketches,
                                                         lambda found: scan.ngrams.read(rows[found]),
                                                         settings.threshold, linking=linking, large=search.large_buckets)
    first, second = scan.near_record[rows[low]], scan.near_record[rows[high]]
    swapped = first > second
    a, b = np.where(swapped, second, first), np.where(swapped, first, second)
    later_key = np.where(swapped, scan.near_key[rows[low]], scan.near_key[rows[high]])
    different = a != b
    a, b, similarity, later_key = a[different], b[different], similarity[different], later_key[different]
    order = np.lexsort((a, b))
    return a[order], b[order], similarity[order], later_key[order]


def _drop_near(scan: _Scan, a: np.ndarray, b: np.ndarray, similarity: np.ndarray, later_key: np.ndarray,
               duplicate_of: np.ndarray, kind: np.ndarray, similarity_of: np.ndarray) -> None:
    """dedup.near: drop. In file order, a record is dropped when an earlier record that is kept
    near-duplicates it; it is recorded as a duplicate of the first such record. The pairs are
    between each text's first record: every later record with the same user turn goes too (it
    near-duplicates the same earlier record), or it would stay, in any split, beside it."""
    import numpy as np

    gone: list[tuple[int, int, float]] = []  # (key of the dropped user turn, the record kept, similarity)
    for x, y, j, key in zip(a.tolist(), b.tolist(), similarity.tolist(), later_key.tolist()):  # sorted by b, then a
        if kind[y] == 0 and kind[x] == 0:
            kind[y] = NEAR
            duplicate_of[y] = x
            similarity_of[y] = j
            gone.append((key, x, j))
    if not gone:
        return
    keys = np.array([key for key, _, _ in gone], np.uint64)
    order = np.argsort(keys)
    keys, kept, similar = keys[order], np.array([x for _, x, _ in gone])[order], np.array([j for _, _, j in gone])[order]
    at = np.minimum(np.searchsorted(keys, scan.turn_key), keys.size - 1)
    hit = np.flatnonzero(keys[at] == scan.turn_key)
    records, at = scan.turn_record[hit], at[hit]
    live = kind[records] == 0
    records, first = np.unique(records[live], return_index=True)  # a record's first such turn (turns are in file order)
    at = at[live][first]
    kind[records] = NEAR
    duplicate_of[records] = kept[at]
    similarity_of[records] = similar[at]


# --- 3. group --------------------------------------------------------------------------


def _components(scan: _Scan, keep: np.ndarray, norm: np.ndarray, near_a: np.ndarray, near_b: np.ndarray,
                by_prompt: bool) -> np.ndarray:
    """Connected components of the kept records over their shared keys (a component number
    per record; dropped records get their own). Records sharing a key are linked in a chain
    (each to the next in key order, in any order among equal keys: the components are the
    same), which connects them with one edge per record."""
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from factory import textsim

    n = scan.records
    alive = np.zeros(n, bool)
    alive[keep] = True
    sources: list[tuple[np.ndarray, np.ndarray]] = [(keep, norm[keep])]
    if by_prompt:
        with_prompt = keep[scan.prompt[keep] != 0]
        sources.append((with_prompt, scan.prompt[with_prompt]))
        live_turns = alive[scan.turn_record]
        sources.append((scan.turn_record[live_turns], scan.turn_key[live_turns]))
    edges_a, edges_b = [near_a], [near_b]
    if not by_prompt:
        edges_a, edges_b = [], []
    for records, keys in sources:
        maybe = textsim.maybe_shared(keys)  # a key no other record has links nothing
        records, keys = records[maybe], keys[maybe]
        order = np.argsort(keys)
        r, k = records[order], keys[order]
        same = k[1:] == k[:-1]
        edges_a.append(r[:-1][same])
        edges_b.append(r[1:][same])
    a = np.concatenate(edges_a) if edges_a else np.zeros(0, np.int64)
    b = np.concatenate(edges_b) if edges_b else np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(a.size, np.int8), (a, b)), shape=(n, n))
    count, labels = connected_components(graph, directed=False)
    # the kept records' labels numbered 0, 1, ... in order (np.unique's inverse, without its sort)
    present = np.zeros(count, bool)
    present[labels[keep]] = True
    component = np.full(n, -1, np.int64)
    component[keep] = (np.cumsum(present) - 1)[labels[keep]]
    return component


def _most_shared_turns(scan: _Scan, keep: np.ndarray, source: Path, seed: int) -> list[dict[str, Any]]:
    """The user turns found in the most kept records, with their text (read back by offset)."""
    import numpy as np

    alive = np.zeros(scan.records, bool)
    alive[keep] = True
    rows = np.flatnonzero(alive[scan.turn_record])
    keys, first, counts = np.unique(scan.turn_key[rows], return_index=True, return_counts=True)
    top = np.argsort(-counts, kind="stable")[:MOST_SHARED]
    found = []
    with open(source, "rb") as f:
        for t in top:
            if counts[t] < 2:
                break
            record = scan.turn_record[rows[first[t]]]
            text = _user_turn_with_key(f, int(scan.offset[record]), int(keys[t]), seed)
            found.append({"text": _cut_text(text), "records": int(counts[t])})
    return found

def _field_from_record(record: dict, key: str) -> bytes | None:
    meta = record.get("meta")
    if isinstance(meta, dict) and key in meta:
        value = meta[key]
    elif key in record and key != "conversations":
        value = record[key]
    else:
        return None
    return None if value is None else orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _show(value: bytes) -> str:
    """How a stratum value appears in the metrics: strings as they are, others as JSON."""
    shown = orjson.loads(value)
    shown = shown if isinstance(shown, str) else value.decode()
    return shown if len(shown) <= 200 else shown[:199] + "…"


# --- 4. assign ------------------------------------------------------------------------


def _assign(group_keys: np.ndarray, group_size: np.ndarray, group_stratum: np.ndarray,
            ratios: tuple[float, float, float], strata: int) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) per group.

    Each split's share of the records comes from one apportionment sequence over all records
    (Sainte-Lague order of seats), so the totals match the ratios as closely as whole numbers
    allow (100 records at 0.8/0.1/0.1 give exactly 80/10/10). A group of more than half the
    smallest split's share would swallow that split wherever it fell (short generic turns can
    tie much of a chat corpus into one group): such groups go first, largest first, each to
    the split it fits in (what the split still lacks holds it) that lacks the largest part of
    its share, or, fitting in none, to the split that lacks the most records (train, for a
    group of most of the records). The other groups then share out what each split still
    lacks, as _lay_out places them.
    """
    import numpy as np

    seats = _seat_sequence(int(group_size.sum()), ratios)
    share = np.bincount(seats, minlength=3)
    large = np.flatnonzero(group_size > max(1, int(share[share > 0].min()) // 2))
    if not large.size:
        return _lay_out(group_keys, group_size, group_stratum, seats, strata)
    split = np.full(group_size.size, -1, np.int8)
    taken = np.zeros(3, np.int64)
    open_splits = np.array([r > 0 for r in ratios])
    for g in large[np.lexsort((group_keys[large], -group_size[large]))].tolist():
        lacking = share - taken
        fits = open_splits & (lacking >= group_size[g])
        k = int(np.argmax(np.where(fits, lacking / np.maximum(share, 1), -np.inf)) if fits.any()
                else np.argmax(np.where(open_splits, lacking, np.iinfo(np.int64).min)))
        split[g] = k
        taken[k] += group_size[g]
    rest = np.flatnonzero(split < 0)
    if rest.size:
        lacking = np.maximum(share - taken, 0)  # at least the records of `rest` in all
        seats = _seat_sequence(int(group_size[rest].sum()), tuple((lacking / lacking.sum()).tolist()))
        split[rest] = _lay_out(group_keys[rest], group_size[rest], group_stratum[rest], seats, strata)
    return split


def _lay_out(group_keys: np.ndarray, group_size: np.ndarray, group_stratum: np.ndarray, seats: np.ndarray,
             strata: int) -> np.ndarray:
    """Split index per group, as `seats` (_seat_sequence over these groups' records) shares
    them out: groups are laid out stratum after stratum, each stratum in key order, and each
    split takes a contiguous run of its stratum: a group goes to the split whose run holds its
    midpoint. A stratum's run lengths are the seats won within its records, so each stratum
    keeps the ratios to within a record per split, and many small strata still spread over
    all splits."""
    import numpy as np

    order = np.lexsort((group_keys, group_stratum))
    size = group_size[order].astype(np.int64)
    stratum = group_stratum[order]
    end = np.cumsum(size)
    twice_mid = 2 * end - size

    stratum_records = np.bincount(stratum, weights=size, minlength=strata).astype(np.int64)
    stratum_end = np.cumsum(stratum_records)
    stratum_start = stratum_end - stratum_records
    # seats of each split among the first x records, at every stratum boundary
    won = [np.searchsorted(np.flatnonzero(seats == k), stratum_end) -
           np.searchsorted(np.flatnonzero(seats == k), stratum_start) for k in range(3)]
    first_cut = stratum_start + won[0]
    second_cut = first_cut + won[1]
    low, high = 2 * first_cut[stratum], 2 * second_cut[stratum]
    # a group whose midpoint is on a cut (an even number of records, as a group of two alone in
    # its stratum) takes the two sides in turn: the later side each time would fill test before val
    on_low, on_high = twice_mid == low, twice_mid == high
    later_low = on_low & (np.cumsum(on_low) % 2 == 0)
    later_high = np.where(low == high, later_low, on_high & (np.cumsum(on_high) % 2 == 0))
    split = ((twice_mid > low) | later_low).astype(np.int8) + ((twice_mid > high) | later_high)
    result = np.empty_like(split)
    result[order] = split
    return result


def _seat_sequence(n: int, ratios: tuple[float, float, float]) -> np.ndarray:
    """Which split wins each of n seats in Sainte-Lague order: split k's c-th seat comes at
    (c - 0.5) / ratio_k; ties go to the earlier split. Every prefix is proportional to
    within about one seat per split."""
    import numpy as np

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
    import numpy as np

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


def _repair(scan: _Scan, search: _NearSearch, settings: Settings, component: np.ndarray, group_size: np.ndarray,
            group_split: np.ndarray, record_split: np.ndarray) -> int:
    """Near-duplicate pairs of user turns left in two splits, searched as the leakage check
    will search the written files (each text once per split, by key and split, candidates
    only across splits). Run where the grouping's search met an LSH bucket too large for all
    its pairs (a long template with a few words changed, thousands of times: it measures each
    member against the bucket's first and its neighbour only, and the check, among other
    rows, meets other neighbours). The groups of each pair found join the split of the
    largest of them, and the search runs again, at most NEAR_REPAIRS times. Updates
    component (joined groups take the number of their largest), group_size, group_split and
    record_split in place; returns the pairs found."""
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from factory import textsim

    record = scan.near_record[search.rows]
    key = scan.near_key[search.rows]
    found = 0
    for _ in range(NEAR_REPAIRS):
        live = np.flatnonzero(record_split[record] >= 0)
        live = live[np.argsort(_text_in_split(key[live], record_split[record[live]]))]  # the check's order
        low, high, _ = textsim.near_duplicate_pairs(search.bands[live], search.sketches[live],
                                                    lambda rows: scan.ngrams.read(search.rows[live[rows]]),
                                                    settings.threshold, labels=record_split[record[live]])
        if not low.size:
            break
        found += int(low.size)
        groups = group_split.size
        a, b = component[record[live[low]]], component[record[live[high]]]
        joined = connected_components(coo_matrix((np.ones(a.size, np.int8), (a, b)), shape=(groups, groups)),
                                      directed=False)[1]
        by_set = np.lexsort((-group_size, joined))  # each joined set, its largest group first
        largest = by_set[np.concatenate(([True], joined[by_set][1:] != joined[by_set][:-1]))]
        head = np.zeros(joined.max() + 1, np.int64)
        head[joined[largest]] = largest
        size = np.bincount(joined, weights=group_size).astype(group_size.dtype)
        group_split[:] = group_split[head[joined]]
        group_size[:] = size[joined]
        kept = component >= 0
        component[kept] = head[joined[component[kept]]]
        record_split[kept] = group_split[component[kept]]
    return found


# --- 5. decontaminate ------------------------------------------------------------------


@dataclass
class Benchmarks:
    """The prompts of the benchmark files, as sorted key arrays for matching in the workers."""

    files: list[dict[str, Any]]
    shown: list[str]  # each benchmark record's prompt, cut, for the metrics
    file_of: np.ndarray
    ngram: int
    grams: np.ndarray  # sorted n-gram hashes of the benchmark prompts
    gram_owner: np.ndarray  # the benchmark record of each
    exact: np.ndarray  # sorted keys of whole prompts and user turns
    exact_owner: np.ndarray

    def match(self, texts: list[str], owner: np.ndarray, exact_record: np.ndarray, exact_keys: np.ndarray) -> dict:
        """The first match of each record of a block: (record, kind 0 exact / 1 n-gram, benchmark record)."""
        import numpy as np
        from factory import textsim

        found = [_lookup(self.exact, self.exact_owner, exact_keys, exact_record, 0)]
        hashes, which = textsim.ngram_hashes(texts, self.ngram)
        found.append(_lookup(self.grams, self.gram_owner, hashes, owner[which], 1))
        record, kind, benchmark = (np.concatenate(parts) for parts in zip(*found))
        order = np.lexsort((kind, record))
        record, kind, benchmark = record[order], kind[order], benchmark[order]
        first = np.concatenate(([True], record[1:] != record[:-1])) if record.size else np.zeros(0, bool)
        return {"hit_record": record[first].astype(np.int64).tobytes(), "hit_kind": kind[first].astype(np.int8).tobytes(),
                "hit_benchmark": benchmark[first].astype(np.int64).tobytes()}


def _lookup(table: np.ndarray, owner: np.ndarray, keys: np.ndarray, records: np.ndarray, kind: int):
    import numpy as np

    if not table.size or not keys.size:
        return np.zeros(0, np.int64), np.zeros(0, np.int8), np.zeros(0, np.int64)
    pos = np.minimum(np.searchsorted(table, keys), table.size - 1)
    hit = table[pos] == keys
    return records[hit], np.full(int(hit.sum()), kind, np.int8), owner[pos[hit]]


def _load_benchmarks(cfg, ws, seed: int) -> Benchmarks:
    """Read the benchmark files with the format phase's readers (any format it reads)."""
    import numpy as np
    from factory import textsim
    from factory.config import InputSpec
    from phases.format import Reject, canonical_records, collect_files

    files, _ = collect_files([InputSpec(path=p) for p in cfg.benchmarks], ws, "data.decontaminate.benchmarks", "test")
    shown: list[str] = []
    file_of: list[int] = []
    gram_texts: list[str] = []
    gram_owner: list[int] = []
    exact: dict[int, int] = {}
    listed = []
    for f, (path, spec) in enumerate(files):
        rel = ws.rel(path)
        count = rejected = 0
        for _, result, _ in canonical_records(path, spec, rel, ws.root):
            if isinstance(result, Reject):
                rejected += 1
                continue
            for conversation in [result] if type(result) is dict else result if type(result) is list else []:
                turns = conversation["conversations"]
                prompt = turns[:-1] if turns[-1]["role"] == "assistant" else turns
                if not prompt:
                    continue
                b = len(shown)
                texts = [textsim.normalize(t["content"]) for t in prompt]
                keys = ["\n".join(texts)] + [t for turn, t in zip(prompt, texts) if turn["role"] == "user"]
                for key in keys:
                    exact.setdefault(textsim.text_key(key, seed), b)
                gram_texts += texts
                gram_owner += [b] * len(texts)
                shown.append(_cut_text("\n".join(t["content"] for t in prompt)))
                file_of.append(f)
                count += 1
        listed.append({"file": rel, "prompts": count, "rejected": rejected})
    if not shown:
        raise InputError(f"data.decontaminate.benchmarks: no benchmark prompts could be read from "
                         f"{', '.join(x['file'] for x in listed)}; check the files (any format `format` reads)")
    hashes, which = textsim.ngram_hashes(gram_texts, cfg.ngram)
    owners = np.asarray(gram_owner, np.int64)[which]
    # n-grams in many benchmark records are template text ("Answer the following question ...")
    pairs = np.unique(np.stack((hashes, owners.astype(np.uint64))), axis=1)
    grams, first, spread = np.unique(pairs[0], return_index=True, return_counts=True)
    specific = spread < BOILERPLATE_RECORDS
    exact_keys = np.fromiter(exact.keys(), np.uint64, len(exact))
    exact_owner = np.fromiter(exact.values(), np.int64, len(exact))
    order = np.argsort(exact_keys)
    return Benchmarks(files=listed, shown=shown, file_of=np.asarray(file_of), ngram=cfg.ngram,
                      grams=grams[specific], gram_owner=pairs[1][first][specific].astype(np.int64),
                      exact=exact_keys[order], exact_owner=exact_owner[order])


def _contamination_metrics(scan: _Scan, hit: np.ndarray, where: np.ndarray, kinds: np.ndarray, owners: np.ndarray,
                           benchmarks: Benchmarks, cfg, source: Path, removed: int) -> dict[str, Any]:
    import numpy as np

    found = {name: int(np.count_nonzero(where == k)) for k, name in enumerate(SPLITS)}
    examples = []
    with open(source, "rb") as f:
        for i in np.argsort(where, kind="stable")[:EXAMPLES]:  # train hits first
            record = orjson.loads(_line_at(f, int(scan.offset[hit[i]])))
            turns = record["conversations"]
            examples.append({
                "split": SPLITS[where[i]], "line": int(scan.line[hit[i]]),
                "match": "exact" if kinds[i] == 0 else f"{cfg.ngram}-gram",
                "text": _cut_text("\n".join(t["content"] for t in turns[:-1] or turns)),
                "benchmark": {"file": benchmarks.files[benchmarks.file_of[owners[i]]]["file"],
                              "prompt": benchmarks.shown[owners[i]]},
            })
    return {
        "benchmarks": benchmarks.files,
        "action": cfg.action,
        "ngram": cfg.ngram,
        "found": found,
        "by_match": {"exact": int(np.count_nonzero(kinds == 0)), "ngram": int(np.count_nonzero(kinds == 1))},
        "removed": removed,
        "remaining_in_train": found["train"] - removed,
        "examples": examples,
    }


# --- 6. write --------------------------------------------------------------------------


def _write(source: Path, blocks: list[tuple[int, int]], scan: _Scan, record_split: np.ndarray,
           ws, progress, check: "_LeakageCheck", pool, log) -> dict[str, dict[str, Any]]:
    """Copy each kept line, unchanged, to its split's file, in input order, and check each
    piece as it is written.

    The workers write (_write_block): each cuts a block into its splits' pieces and writes
    each where it goes in its file, known beforehand from the scan's line lengths, then
    checks them. This process takes their check parts in file order, while a helper thread
    reads the files back in order for their digests and hands them to the disk as they grow.
    Written here before, the block by block reading, cutting and handing over kept this
    process busy for the whole step (1.6 s of 1.7 s at 1M records) with a core to spare.
    """
    import numpy as np

    outputs = [AtomicOutput(ws.split_file(name)) for name in SPLITS]  # the last ones dropped after the scan
    # the scan's blocks, WRITE_BLOCKS a block: fewer, larger jobs (1.1 s against 1.2 for this step)
    joined = np.arange(0, len(blocks), WRITE_BLOCKS)
    count = np.add.reduceat(np.array(scan.block_records, np.int64), joined) if blocks else np.zeros(0, np.int64)
    blanks = np.add.reduceat(np.array(scan.block_blanks, np.int64), joined).tolist() if blocks else []
    blocks = [(blocks[b][0], blocks[min(b + WRITE_BLOCKS, len(blocks)) - 1][1]) for b in joined.tolist()]
    first = np.cumsum(count) - count
    kept = record_split >= 0
    size = np.zeros((len(blocks), len(SPLITS)), np.int64)  # of each block's piece of each file
    np.add.at(size, (np.repeat(np.arange(len(blocks)), count)[kept], record_split[kept]),
              scan.length[kept].astype(np.int64) + 1)
    ends = np.cumsum(size, axis=0)
    place = ends - size
    with outputs[0], outputs[1], outputs[2], ThreadPoolExecutor(1) as reader:
        partial, complete = tuple(str(o.partial) for o in outputs), tuple(str(o.path) for o in outputs)
        jobs = [(str(source), start, end, record_split[a:a + n].tobytes(), scan.offset[a:a + n].tobytes(), blank,
                 partial, complete, place[b].tolist(), size[b].tolist(), check.known is not None, check.signed is None)
                for b, ((start, end), a, n, blank) in enumerate(zip(blocks, first.tolist(), count.tolist(), blanks))]
        digested = []  # in order: the one helper thread takes each block's after the last
        for b, parts in enumerate(_map_blocks(_write_block, jobs, check.settings, 1, log, pool)):
            for part in parts:
                if "line_key" in part:  # the records written there, in order, for _KnownLines to verify
                    part["scan_records"] = first[b] + np.flatnonzero(record_split[first[b]:first[b] + count[b]]
                                                                     == part["job"][3])
                check.add(part)
            digested.append(reader.submit(lambda upto: [o.written_elsewhere(e) for o, e in zip(outputs, upto)],
                                          ends[b].tolist()))
            progress.advance(int(np.count_nonzero(kept[first[b]:first[b] + count[b]])))
        for done in digested:
            done.result()
    return {name: {"path": ws.rel(out.path), "records": 0, "xxh3_128": out.digest.hexdigest()}
            for name, out in zip(SPLITS, outputs)}


def _write_block(job: tuple) -> list[dict[str, Any]]:
    """Cut one block into its splits' pieces, write each at its place in its split file
    (partial, while being written), and check each there: the check's part of it, read back
    from the file (_key_lines, or _check_block where the check parses its lines)."""
    import numpy as np

    source, start, end, which, offsets, blank, partial, complete, places, sizes, keyed, sign = job
    starts = np.frombuffer(offsets, np.uint64).astype(np.int64) - start
    pieces = _cut(_read_block(source, start, end), np.frombuffer(which, np.int8), starts, blank)
    parts = []
    for k, piece in enumerate(pieces):
        if len(piece) != sizes[k]:  # the file is not the one scanned; every later piece's place would be wrong
            raise InputError(f"{source} changed while the split read it (its lines from byte {start} are not the "
                             f"ones scanned): run `factory run split` again once nothing else writes it")
        if not piece:
            continue
        fd = os.open(partial[k], os.O_WRONLY)
        try:
            done = 0
            while done < len(piece):
                done += os.pwrite(fd, memoryview(piece)[done:], places[k] + done)
        finally:
            os.close(fd)
        job = (partial[k], places[k], places[k] + sizes[k], k, complete[k], sign)
        parts.append(_key_lines(job) if keyed else _check_block(job))
    return parts


def _cut(data: bytes, which: np.ndarray, starts: np.ndarray, blank: int) -> list[bytes]:
    """The bytes of one block for each split: its lines whose entry in `which` is 0, 1, 2."""
    import numpy as np

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


def _line_at(f, offset: int) -> bytes:
    f.seek(offset)
    return f.readline().rstrip(b"\n")


def _cut_text(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 1] + "…"


def _write_duplicates(ws, source: Path, scan: _Scan, duplicate_of: np.ndarray, kind: np.ndarray,
                      similarity: np.ndarray) -> dict[str, Any]:
    """data/formatted/duplicates.jsonl: each dropped record with the record it duplicates."""
    import numpy as np

    dropped = np.flatnonzero(kind > 0)
    with AtomicOutput(ws.duplicates_file) as out, open(source, "rb") as f:
        for i in dropped.tolist():
            original = int(duplicate_of[i])
            head = {"kind": KINDS[int(kind[i])], "line": int(scan.line[i]), "duplicate_of_line": int(scan.line[original])}
            if kind[i] == NEAR:
                head["jaccard"] = round(float(similarity[i]), 4)
            out.write(orjson.dumps(head)[:-1] + b',"record":' + _line_at(f, int(scan.offset[i])) +
                      b',"duplicate_of":' + _line_at(f, int(scan.offset[original])) + b"}\n")
    return {"path": ws.rel(ws.duplicates_file), "records": int(dropped.size),
            "by_kind": {name: int(np.count_nonzero(kind == k)) for k, name in KINDS.items()}}


def _write_contaminated(ws, source: Path, scan: _Scan, hit: np.ndarray, where: np.ndarray, kinds: np.ndarray,
                        owners: np.ndarray, benchmarks: Benchmarks, cfg) -> None:
    """data/formatted/contaminated.jsonl: every record that matched a benchmark prompt."""
    with AtomicOutput(ws.contaminated_file) as out, open(source, "rb") as f:
        for i in range(hit.size):
            head = {"line": int(scan.line[hit[i]]), "split": SPLITS[where[i]],
                    "removed": bool(where[i] == 0 and cfg.action == "remove"),
                    "match": "exact" if kinds[i] == 0 else f"{cfg.ngram}-gram",
                    "benchmark": {"file": benchmarks.files[benchmarks.file_of[owners[i]]]["file"],
                                  "prompt": benchmarks.shown[owners[i]]}}
            out.write(orjson.dumps(head)[:-1] + b',"record":' + _line_at(f, int(scan.offset[hit[i]])) + b"}\n")


# --- 7. check --------------------------------------------------------------------------


def measure_leakage(ws, settings: Settings, workers: int = 1, chunk_bytes: int = CHUNK_BYTES, progress=None,
                    log=None, pool=None) -> dict[str, Any]:
    """Leakage between the split files as written (see _LeakageCheck), read afresh."""
    jobs = []
    for k, name in enumerate(SPLITS):
        path = ws.split_file(name)
        if not path.is_file():
            raise InputError(f"{ws.rel(path)} not found: run `factory run split` to write the splits")
        jobs += [(str(path), a, b, k, None, True) for a, b in _blocks(path, chunk_bytes)]
    with _LeakageCheck(ws, settings) as check:
        for part in _map_blocks(_check_block, jobs, settings, workers, log, pool):
            check.add(part, progress)
        return check.result(progress)


class _Signed:
    """The LSH band keys, sketches and n-gram hashes the scan computed for the texts of its
    near-duplicate search, found by the normalized text's key. A text's signature is a
    function of the text alone, so the leakage check, which reads, parses, normalizes and
    keys the written files itself, signs their texts by looking them up here instead of
    hashing every n-gram 64 times again (a third of its work). A text the scan did not sign
    (none while the split files hold lines of the file the scan read, as the split writes
    them) is signed afresh from its file: the measurement does not rest on that."""

    def __init__(self, scan: _Scan, search: _NearSearch, settings: Settings) -> None:
        """From a search of at least one text."""
        self.keys = _SortedKeys(scan.near_key[search.rows])
        self.rows, self.bands, self.sketches = search.rows, search.bands, search.sketches
        self.ngrams, self.settings = scan.ngrams, settings

    def sign(self, keys: np.ndarray, text_of: Callable[[int], bytes]
             ) -> tuple[np.ndarray, np.ndarray, Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]]:
        """(band keys, sketches, ngrams_of) for these text keys, as _user_turns signs them;
        text_of(i) gives the normalized text of keys[i] where it must be signed afresh."""
        import numpy as np
        from factory import textsim
        from factory.textsim import index_ranges

        which, found = self.keys.find(keys)  # 0 where signed afresh below
        # one copy each (a masked assignment would add a temporary of the same size)
        bands, sketches = self.bands[which], self.sketches[which]
        self.bands = self.sketches = None  # the check signs once, for its final search: their memory goes now
        row = np.where(found, self.rows[which], -1)  # in the spilled n-grams
        fresh = np.flatnonzero(~found)
        hashes, owner = textsim.ngram_hashes([text_of(i) for i in fresh.tolist()], self.settings.ngram)
        if fresh.size:
            sig = textsim.minhash(hashes, owner, fresh.size)
            bands[fresh] = textsim.band_keys(sig, *textsim.lsh_params(self.settings.threshold))
            sketches[fresh] = textsim.sketch(sig)
        count = np.bincount(owner, minlength=fresh.size)
        start = np.cumsum(count) - count

        def ngrams_of(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            spilled = row[rows] >= 0
            if spilled.all():
                return self.ngrams.read(row[rows])
            kept, afresh = np.flatnonzero(spilled), np.flatnonzero(~spilled)
            read, read_owner = self.ngrams.read(row[rows[kept]])
            slot = np.searchsorted(fresh, rows[afresh])
            own = hashes[index_ranges(start[slot], count[slot])]
            which = np.concatenate((kept[read_owner], np.repeat(afresh, count[slot])))
            order = np.argsort(which, kind="stable")
            return np.concatenate((read, own))[order], which[order]

        return bands, sketches, ngrams_of


class _KnownLines:
    """The keys of the counted user turns the scan found in each line of the formatted file.
    The split files hold lines of that file, unchanged: the check reads each line back and
    keys it (_key_lines), as exact de-duplication keys lines, and where every line of a part
    has the key of the record the write put there (`scan_records`), takes the user turns the
    scan parsed from the same bytes, a function of the bytes alone, instead of parsing,
    normalizing and keying them again (most of its work). A part with any other line is
    checked afresh (_check_block): the measurement does not rest on the lookup. For the
    near-duplicate search, a text is one the scan searched (long enough) or none."""

    def __init__(self, scan: _Scan) -> None:
        import numpy as np

        self.exact = scan.exact
        self.turn_start = np.concatenate(([0], np.cumsum(np.bincount(scan.turn_record, minlength=scan.records))))
        self.turn_key = scan.turn_key
        self.turn_near = scan.turn_near.view(bool)

    def part(self, lines: dict[str, Any]) -> dict[str, Any] | None:
        """The part as _check_block gives it (the scan's signatures to be looked up), or None
        where a line is not the record the write put there."""
        import numpy as np
        from factory import textsim

        record = lines["scan_records"]
        if record.size != lines["records"] or (self.exact[record] != np.frombuffer(lines["line_key"], np.uint64)).any():
            return None
        count = self.turn_start[record + 1] - self.turn_start[record]
        turns = textsim.index_ranges(self.turn_start[record], count)
        key = self.turn_key[turns]
        line_of_turn = np.repeat(np.arange(record.size), count)
        near = np.flatnonzero(self.turn_near[turns])
        near = near[textsim.first_of_each(key[near])]
        offset = np.frombuffer(lines["line_offset"], np.int64)[line_of_turn]
        line = np.frombuffer(lines["line_line"], np.int64)[line_of_turn]
        return {"split": lines["job"][3], "records": lines["records"], "lines": lines["lines"],
                "key": key.tobytes(), "offset": offset.tobytes(), "line": line.tobytes(),
                "near_key": key[near].tobytes(), "near_offset": offset[near].tobytes(),
                "near_line": line[near].tobytes(), "near_bands": b"", "near_sketch": b"", "near_ngrams": b"",
                "near_ngram_count": b""}


class _SortedKeys:
    """64-bit keys (well mixed), sorted, and where each value of their top bits starts: a
    lookup reads the one or two keys of its bucket instead of binary-searching them all (1.3M
    lookups among 1M keys: 0.07 s, against 0.45 s for np.searchsorted's, a cache miss a step)."""

    def __init__(self, keys: np.ndarray) -> None:
        import numpy as np

        self.order = np.argsort(keys)
        keys = self.keys = keys[self.order]
        bits = max(1, int(keys.size).bit_length() - 1)  # one or two keys a bucket: 2 to 4 bytes a key
        self.shift = np.uint64(64 - bits)
        starts = np.searchsorted(keys, np.arange(1 << bits, dtype=np.uint64) << self.shift)
        self.start = np.append(starts, keys.size).astype(np.int32 if keys.size < 2**31 else np.int64)

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the index each of `keys` had among the keys given, whether it is there at all);
        the index is 0 where it is not there."""
        import numpy as np

        bucket = (keys >> self.shift).astype(np.intp)
        at, end = self.start[bucket], self.start[bucket + 1]
        found = np.zeros(keys.size, bool)
        rest = np.flatnonzero(at < end)
        while rest.size:
            hit = self.keys[at[rest]] == keys[rest]
            found[rest[hit]] = True
            rest = rest[~hit]
            at[rest] += 1
            rest = rest[at[rest] < end[rest]]
        return np.where(found, self.order[np.minimum(at, max(self.keys.size - 1, 0))], 0), found


class _LeakageCheck:
    """Leakage between the split files as written, measured without the grouping: every
    normalized user turn (of at least data.split.min_turn_words words) found in two splits,
    and every pair of different user turns in two splits whose word n-gram Jaccard reaches
    dedup.near_threshold (MinHash LSH candidates, measured exactly). The files are read back
    in parts (_check_block, or _key_lines with `known`) by the workers that write them
    (_write_block) or afresh (measure_leakage), and handed in (add), each file's parts in
    order. With `signed`, the texts' signatures are looked up there (_Signed) instead of
    computed by the parts; with `known`, each part's lines are only keyed, and their user
    turns looked up there (_KnownLines), KEYED_LINES lines of a file at a time."""

    FIELDS = {"split": "b", "key": "Q", "offset": "q", "line": "q", "near_split": "b", "near_key": "Q",
              "near_offset": "q", "near_line": "q", "near_bands": "Q", "near_sketch": "B"}

    def __init__(self, ws, settings: Settings, signed: _Signed | None = None, known: _KnownLines | None = None) -> None:
        self.ws, self.settings, self.signed, self.known = ws, settings, signed, known
        self.records = dict.fromkeys(SPLITS, 0)
        self.lines = dict.fromkeys(SPLITS, 0)
        self.grown = {f: array(code) for f, code in self.FIELDS.items()}  # grown in place, as the scan's
        ws.splits_dir.mkdir(parents=True, exist_ok=True)
        self.spilled = SpilledNgrams(ws.splits_dir)  # the n-gram hashes of each near_* row
        self.keyed: dict[int, list[dict]] = {k: [] for k in range(len(SPLITS))}  # each file's, not looked up yet
        _init_worker(settings)  # for the parts checked in this process

    def __enter__(self) -> "_LeakageCheck":
        return self

    def __exit__(self, *exc) -> None:
        self.spilled.close()

    def add(self, part: dict[str, Any], progress=None) -> None:
        import numpy as np

        if "line_key" in part:
            keyed = self.keyed[part["job"][3]]
            keyed.append(part)
            if sum(p["records"] for p in keyed) >= KEYED_LINES:
                self._look_up(keyed, progress)
            return
        grown = self.grown
        name = SPLITS[part["split"]]
        base_line = self.lines[name]
        self.records[name] += part["records"]
        self.lines[name] += part["lines"]
        for prefix in ("", "near_"):
            grown[prefix + "split"].frombytes(bytes([part["split"]]) * (len(part[prefix + "key"]) // 8))
            grown[prefix + "key"].frombytes(part[prefix + "key"])
            grown[prefix + "offset"].frombytes(part[prefix + "offset"])
            grown[prefix + "line"].frombytes((np.frombuffer(part[prefix + "line"], np.int64) + base_line).tobytes())
        grown["near_bands"].frombytes(part["near_bands"])
        grown["near_sketch"].frombytes(part["near_sketch"])
        self.spilled.add(part["near_ngrams"], part["near_ngram_count"])
        if progress is not None:
            progress.advance(part["records"])

    def _look_up(self, keyed: list[dict], progress) -> None:
        """Add one file's keyed parts (in order) with the user turns _KnownLines finds for their
        lines, all in one lookup; where a line is not known, part by part, those with such a
        line checked afresh."""
        import numpy as np

        lines_before = np.cumsum([0] + [p["lines"] for p in keyed[:-1]])
        merged = {"job": keyed[0]["job"], "records": sum(p["records"] for p in keyed),
                  "lines": sum(p["lines"] for p in keyed),
                  "line_key": b"".join(p["line_key"] for p in keyed),
                  "scan_records": np.concatenate([p["scan_records"] for p in keyed]),
                  "line_offset": b"".join(p["line_offset"] for p in keyed),
                  "line_line": np.concatenate([np.frombuffer(p["line_line"], np.int64) + before
                                               for p, before in zip(keyed, lines_before.tolist())]).tobytes()}
        part = self.known.part(merged)
        parts = [part] if part is not None else [self.known.part(p) or _check_block(p["job"]) for p in keyed]
        keyed.clear()
        for part in parts:
            self.add(part, progress)

    def result(self, progress=None) -> dict[str, Any]:
        """The leakage once every part is in."""
        import numpy as np
        from factory import textsim

        for keyed in self.keyed.values():
            if keyed:
                self._look_up(keyed, progress)
        self.known = None  # every part is in: its memory goes before the search's
        settings = self.settings
        t = {f: np.frombuffer(values, np.dtype(values.typecode)) for f, values in self.grown.items()}
        shared, leaking = _shared_between_splits(t["key"], t["split"])
        # near-duplicates: each distinct text once per split; pairs of different texts in two splits
        rows = textsim.first_occurrences(_text_in_split(t["near_key"], t["near_split"]))
        if self.signed is None:
            bands = t.pop("near_bands").reshape(-1, textsim.lsh_params(settings.threshold)[0])[rows]
            sketches = t.pop("near_sketch").reshape(-1, textsim.NUM_PERM)[rows]
            del self.grown["near_bands"], self.grown["near_sketch"]  # the search's copies replace them

            def ngrams_of(found: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                return self.spilled.read(rows[found])
        else:
            def text_of(i: int) -> bytes:
                with open(self.ws.split_file(SPLITS[t["near_split"][rows[i]]]), "rb") as f:
                    text = _user_turn_with_key(f, int(t["near_offset"][rows[i]]), int(t["near_key"][rows[i]]), settings.seed)
                return textsim.normalize_batch([text])[0]

            bands, sketches, ngrams_of = self.signed.sign(t["near_key"][rows], text_of)

        def different(low: np.ndarray, high: np.ndarray) -> np.ndarray:  # one text in two splits: a shared turn
            return t["near_key"][rows[low]] != t["near_key"][rows[high]]

        low, high, similarity = textsim.near_duplicate_pairs(bands, sketches, ngrams_of, settings.threshold,
                                                             different, t["near_split"][rows])
        a, b = rows[low], rows[high]  # all across splits: only those were candidates
        pair_of = t["near_split"][a].astype(np.int64) + t["near_split"][b]  # 1 train-val, 2 train-test, 3 val-test
        result: dict[str, Any] = {
            "method": "re-read data/splits/*.jsonl; normalized user turns in two splits, and MinHash "
                      f"near-duplicate user turns (Jaccard >= {settings.threshold}, word {settings.ngram}-grams)",
            "records": dict(self.records),
        }
        for (x, y), code in zip(PAIRS, (1, 2, 3)):
            result[f"{x}_{y}"] = {"user_turns": shared[(x, y)], "near_duplicates": int(np.count_nonzero(pair_of == code))}
        result["user_turns"] = sum(result[f"{x}_{y}"]["user_turns"] for x, y in PAIRS)
        result["near_duplicates"] = int(a.size)
        result["total"] = result["user_turns"] + result["near_duplicates"]
        result["examples"] = _leak_examples(self.ws, settings.seed, t, leaking, a, b, similarity)
        return result


def _text_in_split(key: np.ndarray, split: np.ndarray) -> np.ndarray:
    """One key per (text, split): the check's near-duplicate search takes each text once per
    split, in the order of these keys (and _repair searches as it will)."""
    import numpy as np

    return key & ~np.uint64(3) | split.astype(np.uint64)


def _read_part(path: str, start: int, end: int, complete: str | None) -> bytes:
    """Bytes [start, end) of a split file, from `complete` once the file being written at
    `path` was renamed there (written while this waited: the same bytes)."""
    try:
        return _read_block(path, start, end)
    except FileNotFoundError:
        if complete is None:
            raise
        return _read_block(complete, start, end)


def _check_block(job: tuple[str, int, int, int, str | None, bool]) -> dict[str, Any]:
    import numpy as np
    from factory import textsim

    path, start, end, split, complete, sign = job
    data = _read_part(path, start, end, complete)
    block = _Block(complete or path, data, start, role="user")
    texts = textsim.normalize_batch(block.contents)
    part = _user_turns(texts, textsim.text_keys(texts, _SETTINGS.seed), block.record_of_turn, _SETTINGS, near=True,
                       sign=sign)
    turn_record = np.frombuffer(part["turn_record"], np.int64)
    near_record = np.frombuffer(part["near_record"], np.int64)
    return {"split": split, "records": block.records, "lines": block.lines,
            "key": part["turn_key"], "offset": block.offset[turn_record].tobytes(),
            "line": block.line[turn_record].tobytes(), "near_key": part["near_key"],
            "near_offset": block.offset[near_record].tobytes(), "near_line": block.line[near_record].tobytes(),
            "near_bands": part["near_bands"], "near_sketch": part["near_sketch"], "near_ngrams": part["near_ngrams"],
            "near_ngram_count": part["near_ngram_count"]}


def _key_lines(job: tuple[str, int, int, int, str | None, bool]) -> dict[str, Any]:
    """Each line of a part of a split file keyed by its bytes, as the scan keys lines for
    exact de-duplication (_KnownLines compares it with the record of the formatted file the
    write copied there)."""
    from factory import textsim

    path, start, end, split, complete, _ = job
    lines, offset, _, line, count = _lines(_read_part(path, start, end, complete), start)
    return {"job": job, "records": len(lines), "lines": count,
            "line_key": textsim.text_keys(lines, _SETTINGS.seed).tobytes(),
            "line_offset": offset.tobytes(), "line_line": line.tobytes()}


def _user_turn_with_key(f, offset: int, key: int, seed: int) -> str:
    """The user turn of the line at `offset` whose normalized text has this key, as written."""
    from factory import textsim

    record = orjson.loads(_line_at(f, offset))
    for turn in record["conversations"]:
        text = textsim.normalize(turn["content"])
        if turn["role"] == "user" and textsim.text_key(text, seed) == key:
            return turn["content"]
    return ""


def _leak_examples(ws, seed: int, t: dict[str, np.ndarray], leaking: np.ndarray, a: np.ndarray, b: np.ndarray,
                   similarity: np.ndarray) -> list[dict[str, Any]]:
    """A few leaking pairs, with the text and line of each side, for the metrics and the report:
    user turns of the keys `leaking` (as _shared_between_splits gives them), near-duplicate
    rows a[k], b[k]."""
    import numpy as np

    examples = []
    files = {k: open(ws.split_file(name), "rb") for k, name in enumerate(SPLITS)}
    try:
        def side(split: int, offset: int, line: int, key: int) -> dict[str, Any]:
            text = _user_turn_with_key(files[split], offset, key, seed)
            return {"split": SPLITS[split], "line": line + 1, "text": _cut_text(text)}

        masked = t["key"] & ~np.uint64(3)
        for key in leaking[:EXAMPLES].tolist():
            rows = np.flatnonzero(masked == np.uint64(key))
            _, first = np.unique(t["split"][rows], return_index=True)  # the first row in each split
            examples.append({"kind": "user_turn", "pair": [side(int(t["split"][r]), int(t["offset"][r]), int(t["line"][r]),
                                                                int(t["key"][r])) for r in rows[np.sort(first)][:2]]})
        for x, y, j in list(zip(a.tolist(), b.tolist(), similarity.tolist()))[:EXAMPLES]:
            examples.append({"kind": "near_duplicate", "jaccard": round(j, 4), "pair": [
                side(int(t["near_split"][r]), int(t["near_offset"][r]), int(t["near_line"][r]), int(t["near_key"][r]))
                for r in (x, y)]})
    finally:
        for f in files.values():
            f.close()
    return examples


# --- metrics ---------------------------------------------------------------------------


def _shared_between_splits(keys: np.ndarray, split: np.ndarray) -> tuple[dict[tuple[str, str], int], np.ndarray]:
    """For each pair of splits, how many distinct keys occur in both; and the keys found in
    more than one split (their two low bits cleared), sorted.

    One sort of (key, split) packed in 64 bits (the key's two low bits give way to the
    split), then the set of splits of each distinct key as a bit mask.
    """
    import numpy as np

    packed = np.sort((keys & ~np.uint64(3)) | split.astype(np.uint64))
    key = packed >> np.uint64(2)
    starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1]))) if key.size else np.zeros(0, np.int64)
    bits = np.left_shift(np.uint8(1), (packed & np.uint64(3)).astype(np.uint8))
    masks = np.bitwise_or.reduceat(bits, starts) if starts.size else bits
    result = {}
    for a, b in PAIRS:
        both = np.uint8((1 << SPLITS.index(a)) | (1 << SPLITS.index(b)))
        result[(a, b)] = int(np.count_nonzero((masks & both) == both))
    return result, key[starts][(masks & (masks - np.uint8(1))) != 0] << np.uint64(2)


def _strata(record_split: np.ndarray, scan: _Scan, values: np.ndarray) -> dict[str, dict[str, int]]:
    """Records per stratum value in each split (the most frequent values)."""
    import numpy as np

    written = np.flatnonzero(record_split >= 0)
    index = np.searchsorted(values, scan.stratum[written])
    split = record_split[written]
    shown = np.argsort(-np.bincount(index, minlength=values.size), kind="stable")[:MAX_STRATA_SHOWN]
    table = {}
    for k, name in enumerate(SPLITS):
        per_value = np.bincount(index[split == k], minlength=values.size)
        table[name] = {scan.names.get(int(values[v]), f"#{int(values[v]):016x}"): int(per_value[v]) for v in shown}
    return table
