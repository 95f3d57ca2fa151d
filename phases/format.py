"""format: read the raw data in whatever shape it came, write one canonical record per line.

Reads every file of every `data.inputs` entry (a file, or a folder read recursively in sorted
order; hidden files skipped), converts each record to the canonical form of
schemas/record.schema.json

    {"conversations": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...],
     "tools": ... (ShareGPT/OpenAI tool definitions, as given; also written into the system
     turn, so that training sees them), "meta": {...} (e.g. the raw label)}

and writes data/formatted/all.jsonl. Every record that cannot be converted goes to
data/formatted/rejects.jsonl with its file, line (or array index, or row), a reason code, a
sentence saying what to fix, and the start of the raw text. Nothing is dropped silently:

    records_in = converted + rejected + filtered (by a transform)
    records_out = converted + extra records (a tree or a transform giving several)

and a file that cannot be read to its end (a JSON array that breaks, a file cut off, UTF-16)
is listed under `incomplete_files` with the records lost (null: unknown); the data-valid
gate fails on it.

Input shapes (`format`, per input; `auto` decides per file from the extension and a vote of
its first records):
  alpaca             instruction / input / output
  sharegpt           conversations [{from, value}], optional tools and system
  openai             messages [{role, content}] (either under another field: `messages: FIELD`)
  prompt_completion  prompt / completion
  mapped             any fields (JSON, nested paths) or columns (CSV/TSV/Parquet), through `mapping`
  text               each .txt file is one document (a single assistant turn)
  oasst              OpenAssistant message trees (or their message table, a message a row):
                     the best-ranked path or every path

Per input, `records` points into nested JSON (SQuAD's data[*].paragraphs[*]), a `[*]` in a
mapped field gives one record per list element, and `transform: module:function` rewrites
each raw record first.

Files are streamed: JSONL/CSV/TSV line by line, JSON arrays item by item with ijson, Parquet
by row batches. Only a .txt document (one record) or a single top-level JSON object is read whole.
A JSONL file of 64 MB or more (without a transform) is converted by one worker process per CPU,
in line ranges of 1 MB, and written in file order: the same bytes as one pass.
"""

from __future__ import annotations

import csv
import fnmatch
import functools
import importlib
import io
import lzma
import os
import re
import shutil
import sys
import time
import zlib
from collections import Counter, deque
from functools import lru_cache
from itertools import chain, islice
from pathlib import Path
from typing import Any, Callable, Iterator

import ijson
import orjson

from factory import hub
from factory.config import FactoryConfig, InputSpec
from factory.errors import InputError
from factory.io import AtomicOutput, csv_field_size_limit
from factory.phase import Phase, PhaseContext
from factory.workers import default_workers, worker_pool
from factory.workspace import Workspace

EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet")
COMPRESSIONS = (".gz", ".bz2", ".xz")
"""Compressed text files (`train.jsonl.gz`), read as a stream; not Parquet, which compresses itself."""
BATCH = 5000  # records between writes and progress updates
RANGE_BYTES = 1 << 20  # a large JSONL file is converted by worker processes in ranges of about this size
RAW_CHARS = 300  # how much of a rejected record's text goes to rejects.jsonl
DETECT_RECORDS = 20  # `format: auto` votes over this many first records of a file
BOM = b"\xef\xbb\xbf"
ADD_NEWLINE = orjson.OPT_APPEND_NEWLINE
NO_INPUT_FIX = ("put .jsonl/.json/.csv/.tsv/.txt/.parquet files (the text ones may be .gz/.bz2/.xz) in data/raw/ "
                "or set data.inputs in factory.yaml")

# Role order over one letter per turn, s(ystem) u(ser) a(ssistant) t(ool): an optional system
# turn, then user/assistant pairs, tool results only right after an assistant (function call)
# turn and always answered by the assistant. The last turn is therefore an assistant turn.
CHAT_ORDER = re.compile(r"s?(?:ua(?:t+a)*)+")
EXPECTED_ORDER = (
    "expected an optional system turn, then user and assistant alternating (tool turns only "
    "after an assistant turn), ending with an assistant turn"
)

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    # the raw ShareGPT crawl (Vicuna's) names some answers after the assistant that wrote them
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
OPENAI_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "model": "assistant",  # Gemini's and Gemma's name for it
    "tool": "tool",
    "function": "tool",
}
OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


class Reject(Exception):
    """One record that cannot be converted: a reason code and a sentence saying what to fix."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


FILTERED = object()
"""What a record becomes when its input's transform returns nothing for it."""


# --- the phase ---------------------------------------------------------------------------


def run(ctx: PhaseContext) -> dict[str, Any]:
    started = time.perf_counter()
    ws = ctx.workspace
    files, skipped = collect_files(ctx.config.data.inputs, ws)
    if not files:
        where = ", ".join(ws.rel(p) for p in _input_paths(ctx.config, ws))
        unread = f" (files of other kinds there: {', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''})" if skipped else ""
        raise InputError(f"no input files found in {where}{unread}; {NO_INPUT_FIX}")
    for rel in skipped:
        ctx.log.warning("format: %s skipped: not a file kind the phase reads (%s)", rel, NO_INPUT_FIX)

    ctx.progress.start(None, "records")
    per_file: dict[str, dict[str, Any]] = {}
    shutil.rmtree(_ranges_folder(ws.formatted_file), ignore_errors=True)  # left by a run that was killed outright
    with AtomicOutput(ws.formatted_file, drop_old=True) as out, AtomicOutput(ws.rejects_file) as rejects:
        for path, spec in files:
            rel = ws.rel(path)
            per_file[rel] = format_any(FileReader(path, spec, rel, ws.root), out, rejects, ctx.progress, ctx.log,
                                       ctx.config.data.workers)
            ctx.log.debug("format: %s: %s", rel, per_file[rel])
        records_in = sum(stats["records_in"] for stats in per_file.values())
        if records_in == 0:
            # Raised inside the `with`, so neither output file is written.
            unread = [f"{rel} ({stats['incomplete']['detail']})" for rel, stats in per_file.items() if stats.get("incomplete")]
            raise InputError(f"no records found in {', '.join(per_file)}; "
                             + (f"unreadable: {'; '.join(unread)}" if unread else NO_INPUT_FIX))

    totals = Counter()
    per_reason: Counter = Counter()
    for stats in per_file.values():
        for key in ("records_out", "converted", "rejected", "filtered"):
            totals[key] += stats[key]
        per_reason.update(stats["reasons"])
        stats["reasons"] = dict(sorted(stats["reasons"].items()))
    incomplete = [{"file": rel, **stats["incomplete"]} for rel, stats in per_file.items() if stats.get("incomplete")]
    rejected, records_out = totals["rejected"], totals["records_out"]
    accounting = {
        "records_in": records_in,
        "converted": totals["converted"],
        "rejected": rejected,
        "filtered": totals["filtered"],
        "records_out": records_out,
        "extra_from_fan_out": records_out - totals["converted"],
        "records_lost_known": sum(x["records_lost"] or 0 for x in incomplete),
        "files_with_unknown_loss": [x["file"] for x in incomplete if x["records_lost"] is None],
        "equation": f"records_in {records_in} = converted {totals['converted']} + rejected {rejected} "
                    f"+ filtered {totals['filtered']}; records_out {records_out} = converted {totals['converted']} "
                    f"+ extra {records_out - totals['converted']}",
    }
    accounting["balanced"] = records_in == totals["converted"] + rejected + totals["filtered"] and not incomplete
    for item in incomplete:
        ctx.log.warning("format: %s could not be read to its end: %s", item["file"], item["detail"])
    for rel, stats in per_file.items():
        if stats.get("mapping_by_name"):
            ctx.log.warning("format: %s has none of the named formats; read by its field names as mapping: %s "
                            "(set data.inputs[].mapping to read it otherwise)", rel,
                            orjson.dumps(stats["mapping_by_name"]).decode())
    ctx.log.info("format: %d records in, %d out, %d rejected", records_in, records_out, rejected)
    return {
        "records_in": records_in,
        "records_out": records_out,
        "rejected": rejected,
        "rejected_ratio": round(rejected / records_in, 6) if records_in else 0,
        "filtered": totals["filtered"],
        "files_incomplete": len(incomplete),
        "incomplete_files": incomplete,
        "accounting": accounting,
        "per_file": per_file,
        "per_reason": dict(sorted(per_reason.items())),
        "skipped_files": skipped,
        "output": ws.rel(ws.formatted_file),
        "output_xxh3_128": out.digest.hexdigest(),
        "rejects": ws.rel(ws.rejects_file),
        "seconds": round(time.perf_counter() - started, 3),
    }


def input_location(ws: Workspace, path: str, split: str = "train") -> Path:
    """A data input's file or folder; a hub dataset's is its snapshot in the hub cache (a new
    commit is a new folder), with `split`'s files downloaded on first use."""
    return hub.dataset_snapshot(path, split)[0] if path.startswith(hub.DATASET_PREFIX) else ws.path(path)


def _input_paths(cfg: FactoryConfig, ws: Workspace) -> list[Path]:
    return [input_location(ws, spec.path) for spec in cfg.data.inputs]


def _outputs(cfg: FactoryConfig, ws: Workspace) -> list[Path]:
    return [ws.formatted_file, ws.rejects_file]


# --- finding the files -------------------------------------------------------------------


def collect_files(inputs: list[InputSpec], ws: Workspace, where: str = "data.inputs",
                  split: str = "train") -> tuple[list[tuple[Path, InputSpec]], list[str]]:
    """(file, its input spec) in a stable order, and the files skipped for their extension;
    a hub dataset named without a pattern gives its `split` (train, or test for benchmarks)."""
    files: list[tuple[Path, InputSpec]] = []
    skipped: list[str] = []
    seen: set[Path] = set()
    # A folder input such as `data` must not read this phase's or split's own outputs.
    own_outputs = {ws.formatted_dir.resolve(), ws.splits_dir.resolve()}
    for i, spec in enumerate(inputs):
        if spec.path.startswith(hub.DATASET_PREFIX):
            candidates = _dataset_files(spec.path, f"{where}[{i}]", split)
        else:
            candidates = _local_files(ws, spec.path, f"{where}[{i}]" + (".path" if where == "data.inputs" else ""),
                                      own_outputs)
        for path in candidates:
            if file_kind(path) is None:
                skipped.append(ws.rel(path))
                continue
            key = path.resolve()
            if key not in seen:  # overlapping inputs: the first one that names a file reads it
                seen.add(key)
                files.append((path, spec))
    return files, skipped


def _local_files(ws: Workspace, path: str, key: str, excluded: set[Path]) -> list[Path]:
    root = ws.path(path)
    if not root.exists():
        raise InputError(f"{key}: {ws.rel(root)} does not exist; {NO_INPUT_FIX} (or fix the path)")
    if root.is_dir():
        return _walk(root, excluded)
    if root.resolve().parent in excluded:  # format drops its last output as it starts writing the new one
        raise InputError(f"{key}: {ws.rel(root)} is an output of the factory (data/formatted/ and data/splits/ are "
                         f"written anew by each run); copy it elsewhere, e.g. to data/raw/, and point the path there")
    if file_kind(root) is None:
        raise InputError(f"{key}: {ws.rel(root)} is not a .jsonl, .json, .csv, .tsv, .txt or .parquet file (nor a "
                         ".gz, .bz2 or .xz of a text one); convert it or point the path at a supported file")
    return [root]


def _dataset_files(uri: str, key: str, split: str) -> list[Path]:
    folder, patterns, split_by_name = hub.dataset_snapshot(uri, split)
    files = {p.relative_to(folder).as_posix(): p for p in _walk(folder, set()) if file_kind(p)}
    chosen = [f for f in files if any(fnmatch.fnmatch(f, pattern) for pattern in patterns)]
    chosen = hub.split_files(chosen, split) if split_by_name else chosen
    found = [files[f] for f in chosen]
    if not found:
        raise InputError(f"{key}: {uri} matches no file of the dataset that the phase reads; name them with a "
                         "pattern after the name, e.g. hf://datasets/OWNER/NAME/data/train-*.parquet")
    return found


def file_kind(path: Path) -> tuple[str, str | None] | None:
    """(kind, compression) of a file the phase reads, e.g. ("jsonl", ".gz"); None for others."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSIONS else None
    if not suffixes or suffixes[-1] not in EXTENSIONS or (compression and suffixes[-1] == ".parquet"):
        return None
    return suffixes[-1][1:], compression


def _walk(root: Path, excluded: set[Path]) -> list[Path]:
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and (Path(folder) / d).resolve() not in excluded]
        found.extend(Path(folder) / name for name in names if not name.startswith("."))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


# --- one file ----------------------------------------------------------------------------


def format_any(reader: "FileReader", out: AtomicOutput, rejects: AtomicOutput, progress, log,
               workers: int | None = None) -> dict:
    """Convert one file (format_file), a large JSONL file in worker processes (`workers`:
    data.workers)."""
    # ranges need seeking to byte offsets: a compressed file is read in one stream
    parallel = reader.kind == "jsonl" and not reader.spec.transform and reader.compression is None
    workers = default_workers(reader.path.stat().st_size, workers) if parallel else 1
    decided = reader.decided_format() if workers > 1 else None
    if decided is None or decided[0] == "oasst":  # a message table's rows link across the file: one pass
        return format_file(reader, out, rejects, progress)
    return format_in_ranges(reader, *decided, out, rejects, progress, workers, log)


def format_file(reader: "FileReader", out: AtomicOutput, rejects: AtomicOutput, progress) -> dict:
    """Convert one file, appending to the output and rejects files; return its statistics."""
    stats: dict[str, Any] = {"format": None, "records_in": 0, "records_out": 0, "converted": 0, "rejected": 0,
                             "filtered": 0, "reasons": Counter()}
    lines: list[bytes] = []
    dumps = orjson.dumps
    for loc, result, raw in reader:
        if type(result) is dict:  # the common case: one record
            lines.append(dumps(result, None, ADD_NEWLINE))
            stats["converted"] += 1
        elif type(result) is list:
            lines.extend(dumps(r, None, ADD_NEWLINE) for r in result)
            stats["converted"] += 1
        elif result is FILTERED:
            stats["filtered"] += 1
        else:
            rejects.write(dumps(reader.reject_entry(loc, result, raw), None, ADD_NEWLINE))
            stats["rejected"] += 1
            stats["reasons"][result.reason] += 1
        if len(lines) >= BATCH:
            _flush(lines, out, stats, progress)
    _flush(lines, out, stats, progress)
    progress.advance(stats["rejected"] + stats["filtered"])
    stats["records_in"] = stats["converted"] + stats["rejected"] + stats["filtered"]
    stats["format"] = reader.format
    if reader.mapping_by_name:
        stats["mapping_by_name"] = reader.mapping_by_name
    if reader.encoding != "utf-8":
        stats["encoding"] = reader.encoding
    if reader.incomplete:
        stats["incomplete"] = reader.incomplete
    return stats


def _flush(lines: list[bytes], out: AtomicOutput, stats: dict, progress) -> None:
    if lines:
        out.write(b"".join(lines))
        stats["records_out"] += len(lines)
        progress.advance(len(lines))
        lines.clear()


def format_in_ranges(reader: "FileReader", fmt: str, by_name: dict[str, Any] | None, out: AtomicOutput,
                     rejects: AtomicOutput, progress, workers: int, log) -> dict:
    """format_file for a large JSONL file: its lines are independent, so worker processes
    convert line-aligned ranges of it (format_file on each, with the format, and the mapping
    by field names, the file's first records decided), each into a file of its own in a
    folder beside the output, and this process appends those files and the rejects in file
    order. The converted text does not come back through the pool's pipe: pickled, sent and
    unpickled, it cost this process more CPU than the workers' conversion left it. At most
    two ranges per worker are in flight, so memory does not grow with the file, and as many
    files take turns: each is written over from its start, never removed or emptied between
    ranges (a file a range: 0.26 s of this process at 1M records in removing them). A worker
    numbers its range's lines from 1, and this process adds the lines of the ranges before
    it to the line numbers of its rejects: reading the file here to count them first made
    the phase 0.3 s slower at 1M records (3.1-3.4 s against 2.9-3.1).

    A transform may keep state from record to record, so a file with one is read in one pass."""
    stats: dict[str, Any] = {"format": fmt, "records_in": 0, "records_out": 0, "converted": 0, "rejected": 0,
                             "filtered": 0, "reasons": Counter(), **({"mapping_by_name": by_name} if by_name else {})}
    spec = reader.spec.model_copy(update={"mapping": by_name}) if by_name else reader.spec
    folder = _ranges_folder(out.path)
    folder.mkdir()
    in_flight = 2 * workers
    jobs = ((reader.path, spec, reader.rel, reader.root, fmt, byte_range, folder / f"{k % in_flight}.jsonl")
            for k, byte_range in enumerate(_line_ranges(reader.path, RANGE_BYTES)))
    lines_before = 0
    try:
        with worker_pool(workers, log, "format") as pool:
            pending: deque = deque()
            for job in chain(jobs, [None]):
                if job is not None:
                    pending.append(pool.submit(_format_range, job))
                while pending and (job is None or len(pending) >= in_flight):
                    part = pending.popleft().result()
                    with open(part.pop("out"), "rb") as converted:
                        out.write(converted.read(part.pop("size")))
                    rejects.write(_lines_moved(part.pop("rejects"), lines_before))
                    for key in ("records_in", "records_out", "converted", "rejected", "filtered"):
                        stats[key] += part[key]
                    stats["reasons"].update(part["reasons"])
                    if part.get("incomplete"):  # the last line cut off: only the last range can have it
                        stats["incomplete"] = _last_line_cut(part["incomplete"]["at"] + lines_before)
                    lines_before += part["lines"]
                    progress.advance(part["records_out"] + part["rejected"] + part["filtered"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return stats


def _ranges_folder(output: Path) -> Path:
    """Where format_in_ranges's workers write their ranges while `output` is written."""
    return output.with_name(f".{output.name}.ranges.partial")


def _line_ranges(path: Path, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of line-aligned byte ranges of about `size` bytes covering the file (after
    a UTF-8 BOM)."""
    total = path.stat().st_size
    with open(path, "rb") as f:
        start = 3 if f.read(3) == BOM else 0
        while start < total:
            end = total
            if start + size < total:
                f.seek(start + size)
                f.readline()
                end = f.tell()
            yield start, end
            start = end


def _lines_moved(rejects: bytes, lines_before: int) -> bytes:
    """Reject entries (JSON lines) of a range with `lines_before` added to their line numbers."""
    if not rejects or not lines_before:
        return rejects
    entries = [orjson.loads(line) for line in rejects.splitlines()]
    for entry in entries:
        entry["line"] += lines_before
    return b"".join(orjson.dumps(entry, None, ADD_NEWLINE) for entry in entries)


class _NoProgress:
    def start(self, total: int | None, unit: str) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass


def _format_range(job: tuple) -> dict:
    """format_file on one range of a JSONL file (in a worker process), written over the start
    of the file `target` (which may be longer: `size` says where this range's output ends);
    with the number of lines in the range."""
    path, spec, rel, root, fmt, byte_range, target = job
    rejects = io.BytesIO()
    reader = FileReader(path, spec, rel, root, fmt, byte_range)
    with open(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644), "wb") as out:
        stats = format_file(reader, out, rejects, _NoProgress())
        size = out.tell()
    return {**stats, "out": target, "size": size, "rejects": rejects.getvalue(), "lines": reader.lines}


def canonical_records(path: Path, spec: InputSpec, rel: str, root: Path | None = None):
    """(location, canonical record or list of them, or a Reject or FILTERED, raw) for each
    record of one file: what `format` writes, for other phases that read user files (split's
    benchmark files)."""
    return FileReader(path, spec, rel, root or Path.cwd())


class FileReader:
    """One file read to canonical records, in order: iterate for (location, result, raw).

    After the iteration, `format` is the format used, `encoding` the text encoding, and
    `incomplete` says why the file could not be read to its end (None if it was).

    With `line_range` (start, end) only the lines in those bytes of a JSONL file are read,
    numbered from 1, in the format `fmt` that the whole file's first records decided; `lines`
    is then their number."""

    def __init__(self, path: Path, spec: InputSpec, rel: str, root: Path, fmt: str | None = None,
                 line_range: tuple[int, int] | None = None):
        self.path, self.spec, self.rel, self.root = path, spec, rel, root
        self.fixed_format, self.line_range = fmt, line_range
        self.lines = 0
        self.kind, self.compression = file_kind(path)  # jsonl, json, csv, tsv, txt, parquet; .gz, .bz2, .xz
        self.format: str | None = None
        self.mapping_by_name: dict[str, Any] | None = None
        self.encoding = "utf-8"
        self.incomplete: dict[str, Any] | None = None
        self.location = {"jsonl": "line", "csv": "line", "tsv": "line", "json": "index", "parquet": "row"}.get(self.kind)
        self.delimiter = "\t" if self.kind == "tsv" else ","

    def reject_entry(self, loc: Any, problem: Reject, raw: Any) -> dict[str, Any]:
        entry: dict[str, Any] = {"file": self.rel}
        if isinstance(loc, tuple):  # a record inside a list of a raw record: (line, element)
            loc, element = loc
            entry["element"] = element
        if self.location is not None:
            entry[self.location] = loc
        entry.update(reason=problem.reason, detail=problem.detail, raw=_raw_text(raw, self.delimiter))
        return entry

    def _open(self):
        if self.compression is None:
            return open(self.path, "rb")
        import bz2
        import gzip

        return {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}[self.compression](self.path, "rb")

    def __iter__(self) -> Iterator[tuple[Any, Any, Any]]:
        with self._open() as f, csv_field_size_limit():  # long documents in one cell are fine
            if self.line_range:
                start, end = self.line_range
                f.seek(start)
                data = f.read(end - start)
                self.lines = data.count(b"\n")
                yield from self._converted(self._pipeline(io.BytesIO(data)))
                return
            head = f.read(4)
            if self._unreadable_encoding(head, f):
                return
            f.seek(3 if head.startswith(BOM) else 0)
            if self.compression is None:
                yield from self._converted(self._pipeline(f))
                return
            last = None
            try:
                for last in self._converted(self._pipeline(f)):
                    yield last
            except (EOFError, OSError, zlib.error, lzma.LZMAError) as e:  # gzip, bz2 and lzma: a cut or damaged file
                self.incomplete = {"reason": "truncated_file", "records_lost": None, "at": last[0] if last else 0,
                                   "detail": f"the {self.compression} stream ends or breaks after "
                                             f"{'record ' + str(last[0]) if last else 'no record'} ({e}); the rest "
                                             "of the file is missing: download or copy it again"}

    def decided_format(self) -> tuple[str, dict[str, Any] | None] | None:
        """The format a full read picks for this file from its first records and its mapping by
        field names (choose_converter), or None when the file is not UTF-8 or none of its first
        records can decide it."""
        with self._open() as f, csv_field_size_limit():
            head = f.read(4)
            if self._unreadable_encoding(head, f):
                return None
            f.seek(3 if head.startswith(BOM) else 0)
            usable = self._usable(list(islice(self._pipeline(f), DETECT_RECORDS)))
        if not usable:
            return None
        fmt, _, by_name = choose_converter(self.spec, self.kind, usable, self.rel)
        return fmt, by_name

    def _pipeline(self, f) -> Iterator[tuple[Any, Any, Any]]:
        """The raw items of the file (records inside documents, transformed, fanned out)."""
        items = self._items(f)
        if self.spec.format in ("auto", "oasst") and not (self.spec.records or self.spec.mapping or self.spec.transform):
            items = _message_table_as_trees(items)
        if self.spec.records and self.kind != "json":
            items = _within(items, self.spec.records)
        if self.spec.transform:
            items = _transformed(items, _transform(self.spec.transform, self.root))
        if list_path := _fan_out_list(self.spec):
            items = _fanned_out(items, list_path)
        return items

    def _unreadable_encoding(self, head: bytes, f) -> bool:
        """UTF-16 and UTF-32 files (with or without a BOM) cannot be read as UTF-8: the file is
        recorded as not read, with its records unknown."""
        if self.kind == "parquet":
            return False
        sample = head + f.read(4092)
        boms = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16"}
        found = next((name for bom, name in boms.items() if sample.startswith(bom)), None)
        if found is None and len(sample) >= 8:
            # ASCII text in UTF-16 without a BOM: every other byte is 0
            even, odd = sample[0:len(sample) & ~1:2], sample[1:len(sample) & ~1:2]
            if even.count(0) > 0.4 * len(even) or odd.count(0) > 0.4 * len(odd):
                found = "UTF-16 (no BOM)"
        if found is None:
            return False
        self.encoding = found
        self.format = self.spec.format if self.spec.format != "auto" else None
        self.incomplete = {"reason": "encoding", "records_lost": None, "at": 0,
                           "detail": f"the file is {found}, not UTF-8, so none of it was read; re-save it as UTF-8 "
                                     f"(e.g. iconv -f UTF-16 -t UTF-8)"}
        return True

    def _items(self, f) -> Iterator[tuple[Any, Any, Any]]:
        if self.kind == "jsonl":
            return self._jsonl(f)
        if self.kind == "json":
            return self._json(f)
        if self.kind in ("csv", "tsv"):
            return csv_items(f, self.kind, self.spec.header)
        if self.kind == "parquet":
            return parquet_items(self.path)
        return text_items(f)

    def _jsonl(self, f) -> Iterator[tuple[int, Any, bytes]]:
        last = None
        for last in jsonl_items(f):
            yield last
        if last is not None and type(last[1]) is Reject and last[1].reason == "truncated_json" and not last[2].endswith(b"\n"):
            self.incomplete = _last_line_cut(last[0])

    def _json(self, f) -> Iterator[tuple[int, Any, Any]]:
        for index, record, raw in json_items(f, self.path, _ijson_prefix(self.spec.records)):
            if type(record) is Reject and record.reason in ("truncated_json", "invalid_json"):
                self.incomplete = {"reason": record.reason, "records_lost": None, "at": index,
                                   "detail": record.detail}
            yield index, record, raw

    def _converted(self, items: Iterator[tuple[Any, Any, Any]]) -> Iterator[tuple[Any, Any, Any]]:
        """Items -> canonical records, with the converter chosen from the first records."""
        expected = str if self.kind == "txt" else dict
        first = list(islice(items, DETECT_RECORDS))
        usable = self._usable(first)
        convert = None
        if self.fixed_format:
            self.format, convert, self.mapping_by_name = choose_converter(
                self.spec.model_copy(update={"format": self.fixed_format}), self.kind, usable, self.rel)
        elif usable:
            self.format, convert, self.mapping_by_name = choose_converter(self.spec, self.kind, usable, self.rel)
        for loc, item, raw in chain(first, items):
            if convert is None and type(item) is expected:  # nothing usable among the first records
                self.format, convert, self.mapping_by_name = choose_converter(self.spec, self.kind, [item], self.rel)
            yield loc, _convert(convert, item, expected), raw
        if self.format is None:
            self.format = "text" if self.kind == "txt" else self.spec.format

    def _usable(self, first: list[tuple[Any, Any, Any]]) -> list[Any]:
        """The records among the first items that can decide the format."""
        expected = str if self.kind == "txt" else dict
        return [r for it in first for r in (it[1] if type(it[1]) is _Several else [it[1]]) if type(r) is expected]


def _convert(convert: Callable[[Any], Any] | None, item: Any, expected: type) -> Any:
    if type(item) is not expected and type(item) is not _Several or convert is None:
        return item if type(item) is Reject or item is FILTERED else _not_an_object(item)
    try:
        return convert(item)
    except Reject as problem:
        return problem


def _not_an_object(item: Any) -> Reject:
    return Reject("wrong_type", f"the record is a JSON {_json_type(item)}, not an object with fields; remove it or wrap it")


def _raw_text(raw: Any, delimiter: str) -> str:
    if isinstance(raw, bytes):
        text = raw[:RAW_CHARS * 4].decode("utf-8", "replace")
    elif isinstance(raw, str):
        text = raw
    elif isinstance(raw, list) and all(type(cell) is str for cell in raw):  # a CSV row
        text = delimiter.join(raw)
    else:
        text = orjson.dumps(raw, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    return text.rstrip("\r\n")[:RAW_CHARS]


# --- readers: yield (line, index or row; record or Reject; raw text) ------------------------


def jsonl_items(f) -> Iterator[tuple[int, Any, bytes]]:
    """One record per line. Each line is parsed (and UTF-8 checked) on its own, so one bad line
    is one reject. Blank lines are not records."""
    loads = orjson.loads
    for lineno, line in enumerate(f, 1):
        try:
            record = loads(line)
        except orjson.JSONDecodeError as e:
            if line.isspace() or not line:
                continue
            record = _json_line_problem(line, e)
        yield lineno, record, line


def _last_line_cut(line: int) -> dict[str, Any]:
    return {"reason": "truncated_file", "records_lost": None, "at": line,
            "detail": f"the last line ({line}) is cut off, so the file was probably cut while copying and the "
                      "records after it are missing; restore the end of the file"}


def _json_line_problem(line: bytes, error: Exception) -> Reject:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as e:
        return Reject(
            "undecodable",
            f"the line is not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1}); re-save the file as UTF-8",
        )
    message = str(error).split(":", 1)[0]
    if "end of data" in message or "EOF" in message:
        return Reject("truncated_json", "the line ends before its JSON object is complete; fix or remove the line")
    return Reject("invalid_json", f"the line is not valid JSON ({error}); fix or remove the line")


def json_items(f, path: Path, prefix: str = "item") -> Iterator[tuple[int, Any, Any]]:
    """A JSON array, item by item (or the items at an ijson prefix, for `records`); a
    top-level object is one record (several objects one after another, JSONL saved as .json,
    are read in turn). The location is the 0-based index of the record."""
    first = _first_non_space(f)
    if first is None:
        return
    array = first == b"[" or prefix != "item"
    index = 0
    try:
        for record in ijson.items(f, prefix if array else "", use_float=True, multiple_values=not array):
            # raw: the record itself (written as JSON if rejected); other values as JSON text now,
            # so that a string item shows with its quotes
            yield index, record, record if type(record) is dict else orjson.dumps(record)
            index += 1
    except ijson.JSONError as e:
        message = e.args[0] if e.args else str(e)
        message = message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)
        headline, _, context = message.partition("\n")
        if "premature EOF" in headline:
            yield index, Reject(
                "truncated_json",
                f"the file ends in the middle of record {index} (cut off while copying?); "
                f"the {index} records before it were kept, how many followed is unknown; restore the end of the file",
            ), _file_tail(path)
        else:
            yield index, Reject(
                "invalid_json",
                f"the JSON breaks at record {index} ({headline.strip()}); the {index} records before it "
                "were kept, nothing after it could be read (how many records is unknown); fix the file there",
            ), context.strip()


def _first_non_space(f) -> bytes | None:
    """The first non-whitespace byte, leaving the file where it was."""
    start = f.tell()
    while chunk := f.read(1 << 16):
        stripped = chunk.lstrip()
        if stripped:
            f.seek(start)
            return stripped[:1]
    f.seek(start)
    return None


def _file_tail(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - RAW_CHARS))
        return f.read()


def csv_items(f, kind: str, header: bool = True) -> Iterator[tuple[int, Any, Any]]:
    """CSV/TSV rows as {column name: value}, or {column number: value} without a header.
    Lines are decoded one by one, so an undecodable line is one reject; csv.reader reads from
    those lines, so quoted fields spanning lines still work in CSV. TSV has no quoting (a `"`
    is an ordinary character, as in GLUE's files)."""
    where = {"first_line": 0}  # first physical line of the row being read
    undecodable: list[tuple[int, Reject, bytes]] = []

    def decoded_lines() -> Iterator[str]:
        for lineno, line in enumerate(f, 1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                undecodable.append((lineno, Reject("undecodable", f"the line is not UTF-8 text (byte 0x{line[e.start]:02x} "
                                                                  f"at column {e.start + 1}); re-save the file as UTF-8"), line))
                continue
            if not where["first_line"]:
                where["first_line"] = lineno
            yield text

    if kind == "tsv":
        reader = csv.reader(decoded_lines(), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(decoded_lines())
    names: list[Any] | None = None if header else []
    while True:
        try:
            row = next(reader)
        except StopIteration:
            yield from undecodable
            return
        except csv.Error as e:
            yield from undecodable
            undecodable.clear()
            yield where["first_line"], Reject("invalid_csv", f"the row cannot be read as {kind.upper()} ({e}); fix its quoting"), ""
            where["first_line"] = 0
            continue
        yield from undecodable
        undecodable.clear()
        line, where["first_line"] = where["first_line"], 0
        if not row:  # a blank line
            continue
        if names is None:
            names = [name.strip() for name in row]
            continue
        if not header:
            yield line, dict(enumerate(row)), row
            continue
        if len(row) > len(names) and any(cell.strip() for cell in row[len(names):]):
            yield line, Reject(
                "wrong_type",
                f"the row has {len(row)} fields but the header has {len(names)} columns; "
                "quote fields that contain the delimiter",
            ), row
            continue
        if len(row) < len(names):  # a short row: its missing columns are missing fields
            yield line, dict(zip(names, row + [None] * (len(names) - len(row)))), row
            continue
        yield line, dict(zip(names, row)), row


def parquet_items(path: Path) -> Iterator[tuple[int, Any, Any]]:
    """Parquet rows as dicts (nested columns as dicts and lists), read in batches."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError for a damaged file
        raise InputError(f"{path}: not a readable Parquet file ({e}); re-export it") from None
    row = 0
    for batch in table.iter_batches(batch_size=BATCH):
        for record in batch.to_pylist():
            yield row, record, record
            row += 1


def text_items(f) -> Iterator[tuple[None, Any, Any]]:
    """A .txt file is one document, read whole (it is one record)."""
    data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        yield None, Reject("undecodable", f"the file is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); re-save it as UTF-8"), data
        return
    yield None, text.replace("\r\n", "\n"), text


# --- nested records, transforms and fan-out ------------------------------------------------

_PATH_TOKEN = re.compile(r"([^.\[\]]+)|\[(\*|\d+)\]")


@lru_cache(maxsize=None)
def parse_path(path: str) -> tuple[Any, ...]:
    """'qas[*].answers[0].text' -> ('qas', '*', 'answers', 0, 'text')."""
    tokens: list[Any] = []
    position = 0
    for match in _PATH_TOKEN.finditer(path):
        if match.start() != position and path[position:match.start()] != ".":
            break
        name, index = match.groups()
        tokens.append(name if name is not None else ("*" if index == "*" else int(index)))
        position = match.end()
    if position != len(path) or not tokens:
        raise InputError(f"{path!r} is not a field path: use names, .name and [0] or [*], e.g. answers.text[0]")
    return tuple(tokens)


def get_field(obj: Any, field: Any) -> Any:
    """A field of a record: a column number, a name, or a path; None when it is not there."""
    if isinstance(field, int):
        if isinstance(obj, dict) and field in obj:
            return obj[field]
        values = list(obj.values()) if isinstance(obj, dict) else []
        return values[field] if field < len(values) else None
    if isinstance(obj, dict) and field in obj:
        return obj[field]
    value = obj
    for token in parse_path(field):
        if isinstance(token, int):
            value = value[token] if isinstance(value, list) and -len(value) <= token < len(value) else None
        elif isinstance(value, dict):
            value = value.get(token)
        else:
            value = None
        if value is None:
            return None
    return value


def _ijson_prefix(records: str | None) -> str:
    """`data[*].paragraphs[*]` -> ijson's prefix `data.item.paragraphs.item`."""
    if not records:
        return "item"
    tokens = parse_path(records)
    if any(isinstance(t, int) for t in tokens):
        raise InputError(f"records: {records!r}: use names and [*] only (e.g. data[*].paragraphs[*])")
    return ".".join("item" if t == "*" else t for t in tokens)


def _message_table_as_trees(items: Iterator) -> Iterator[tuple[Any, Any, Any]]:
    """OpenAssistant's message table (a message a row, with message_id and parent_id: oasst1's
    and oasst2's layout on the hub) as message trees, one item a tree at its root's row, which
    the oasst converter reads like the JSONL trees; any other file's items pass unchanged. The
    rows are linked in memory (oasst2's 135k messages: a few hundred MB). A message whose
    parent is not in the file is rejected (`orphan_message`), never dropped unseen."""
    head = []
    for item in items:
        head.append(item)
        if type(item[1]) is dict:
            break
    first = head[-1][1] if head and type(head[-1][1]) is dict else None
    if first is None or "message_id" not in first or "parent_id" not in first or "replies" in first:
        return chain(head, items)  # not a generator: other files' items pass at C speed
    return _linked_trees(chain(head, items))


def _linked_trees(rows: Iterator) -> Iterator[tuple[Any, Any, Any]]:
    messages: dict[Any, tuple[Any, dict, Any]] = {}
    for loc, row, raw in rows:
        if type(row) is not dict or row.get("message_id") is None:
            yield loc, row if type(row) is Reject else Reject(
                "missing_field", "a row of a message table needs `message_id`; fix the row"), raw
            continue
        messages[row["message_id"]] = (loc, {**row, "replies": []}, raw)
    roots = []
    for loc, message, raw in messages.values():  # in file order
        parent = message.get("parent_id")
        if parent is None:
            roots.append((loc, message, raw))
        elif parent in messages:
            messages[parent][1]["replies"].append(message)
        else:
            yield loc, Reject("orphan_message", f"message {message['message_id']}: its parent {parent} is not in the "
                                                "file, so its conversation cannot be rebuilt; add the file that holds "
                                                "it to the same input"), raw
    yield from roots


def _within(items: Iterator, records: str) -> Iterator[tuple[Any, Any, Any]]:
    """The records at a path inside each document (a JSONL line): one item per match."""
    tokens = parse_path(records)
    for loc, document, raw in items:
        if type(document) is Reject:
            yield loc, document, raw
            continue
        found = list(_walk_path(document, tokens))
        if not found:
            yield loc, Reject("missing_field", f"nothing at `{records}` in this record; fix data.inputs[].records "
                                               "or the record"), raw
        for k, record in enumerate(found):
            yield (loc, k) if len(found) > 1 else loc, record, record


def _walk_path(value: Any, tokens: tuple) -> Iterator[Any]:
    if not tokens:
        yield value
        return
    token, rest = tokens[0], tokens[1:]
    if token == "*":
        if isinstance(value, list):
            for element in value:
                yield from _walk_path(element, rest)
    elif isinstance(value, dict) and token in value:
        yield from _walk_path(value[token], rest)


def _fan_out_list(spec: InputSpec) -> str | None:
    """The list (a path) whose elements become records, from mapping fields with `[*]`."""
    return next((f.split("[*]")[0] for _, f in spec.mapped_fields if isinstance(f, str) and "[*]" in f), None)


def _fanned_out(items: Iterator, list_path: str) -> Iterator[tuple[Any, Any, Any]]:
    """One item per element of the list at `list_path`: the record with that list replaced by
    the element, so `qas[*].question` reads the element's question and other fields the record's."""
    for loc, item, raw in items:
        if type(item) is not dict:
            yield loc, item, raw
            continue
        elements = get_field(item, list_path)
        if not isinstance(elements, list) or not elements:
            yield loc, Reject("missing_field", f"`{list_path}` is {'empty' if isinstance(elements, list) else 'not a list'}; "
                                               "the mapping reads one record per element of it"), raw
            continue
        for k, element in enumerate(elements):
            yield (loc, k), {**item, _ELEMENT: element, _ELEMENT_OF: list_path}, element


_ELEMENT, _ELEMENT_OF = "\0element", "\0element_of"


@lru_cache(maxsize=None)
def _transform_function(spec: str, root: str) -> Callable[[Any], Any]:
    module_name, function_name = spec.split(":")
    added = root not in sys.path
    if added:
        sys.path.insert(0, root)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise InputError(f"data.inputs[].transform: cannot import {module_name!r} ({type(e).__name__}: {e}); "
                         "put the module in the workspace folder or on PYTHONPATH") from None
    finally:
        if added:
            sys.path.remove(root)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise InputError(f"data.inputs[].transform: {module_name} has no function {function_name!r}")
    return function


def _transform(spec: str, root: Path) -> Callable[[Any], Any]:
    return _transform_function(spec, str(root))


def _transformed(items: Iterator, function: Callable[[Any], Any]) -> Iterator[tuple[Any, Any, Any]]:
    """The transform's records for each raw record: one, several (numbered elements) or none."""
    for loc, item, raw in items:
        if type(item) is Reject:
            yield loc, item, raw
            continue
        try:
            result = function(item)
        except Exception as e:  # the user's code: any error rejects this record, with its message
            yield loc, Reject("transform_error", f"the transform raised {type(e).__name__}: {e}"), raw
            continue
        if result is None or result == []:
            yield loc, FILTERED, raw
        elif isinstance(result, list):
            yield loc, _Several(result), raw
        else:
            yield loc, result, raw


class _Several(list):
    """Several records a transform made from one raw record (converted one by one)."""


# --- choosing a converter ----------------------------------------------------------------


def choose_converter(spec: InputSpec, kind: str, first: list[Any], rel: str
                     ) -> tuple[str, Callable[[Any], Any], dict[str, Any] | None]:
    """The format name and the function for this file, from the spec and its first records, and
    the mapping `format: auto` chose by field names (None when it chose none)."""
    fmt, by_name = spec.format, None
    if kind == "txt":
        if fmt not in ("auto", "text"):
            raise InputError(f"{rel}: a .txt file is read as one plain-text document (format text), not as {fmt}; "
                             "save the records as .jsonl or set format: text for this input")
        fmt, convert = "text", text_document
    else:
        if fmt == "auto" and spec.messages:  # openai when no first record has the list: rejected naming the field
            fmt = next((found for r in first if type(r) is dict and (found := _messages_written_as(r.get(spec.messages)))),
                       "openai")
        elif fmt == "auto":
            fmt = detect_format(first, spec, kind, rel)
        if fmt == "mapped" and not spec.mapping:  # records known by their field names (Dolly, MetaMath, GSM8K)
            by_name = fields_by_name(first)
            spec = spec.model_copy(update={"mapping": by_name})
        if fmt == "mapped" and kind in ("csv", "tsv") and spec.header:
            _check_columns(spec, first[0], kind, rel)
        convert = {
            "alpaca": alpaca,
            "sharegpt": functools.partial(sharegpt, field=spec.messages or "conversations"),
            "openai": functools.partial(openai, field=spec.messages or "messages"),
            "prompt_completion": prompt_completion,
            "text": text_field,
            "oasst": oasst_tree(spec.tree_paths),
        }.get(fmt) or mapped(spec)
    if spec.system_prompt or spec.user_template:
        convert = with_prompts(convert, spec.system_prompt, spec.user_template)
    if spec.meta and kind != "txt":
        convert = with_meta(convert, spec.meta)
    if spec.transform:
        convert = each_of(convert)
    return fmt, convert, by_name


def each_of(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A transform may return several records for one: convert each (one Reject rejects all)."""

    def convert_each(item: Any) -> Any:
        if type(item) is not _Several:
            return convert(item)
        out: list[dict] = []
        for record in item:
            if type(record) is not dict:
                raise _not_an_object(record)
            result = convert(record)
            out.extend(result if type(result) is list else [result])
        return out

    return convert_each


def _record_format(record: dict, kind: str) -> str | None:
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        return "openai"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "message_tree_id" in record or isinstance(record.get("prompt"), dict) and "replies" in record["prompt"]:
        return "oasst"
    if type(record.get("text")) is str and kind not in ("csv", "tsv"):
        return "text"
    return None


def detect_format(first: list[dict], spec: InputSpec, kind: str, rel: str) -> str:
    """The format most of the first records have (the earliest on a tie); records of another
    shape are rejected by its converter."""
    if spec.mapping:
        return "mapped"
    records = [r for r in first if type(r) is dict] or first
    votes = Counter(fmt for fmt in (_record_format(r, kind) for r in records if type(r) is dict) if fmt)
    if votes:
        best = max(votes.values())
        return next(fmt for fmt in (_record_format(r, kind) for r in records) if votes.get(fmt) == best)
    if kind not in ("csv", "tsv") and fields_by_name(records):
        return "mapped"
    keys = [str(k) for k in records[0]] if records and type(records[0]) is dict else []
    example = f"data:\n  inputs:\n    - path: {spec.path}\n      mapping: {suggested_mapping(records[0] if keys else {})}"
    lists = [k for k, v in (records[0].items() if keys else ()) if type(v) is list and v and type(v[0]) is dict]
    turns = [k for k in keys if _messages_written_as(records[0][k])]
    if turns:  # lmsys-chat-1m's `conversation`, preference data's `chosen`
        field = "chosen" if "chosen" in turns else turns[0]
        raise InputError(
            f"{rel}: cannot tell the format of the records; the first record has the keys {', '.join(keys)}, and "
            f"{', '.join(f'`{k}`' for k in turns)} {'holds' if len(turns) == 1 else 'hold'} a conversation: say which "
            f"field holds the conversation, e.g.\ndata:\n  inputs:\n    - path: {spec.path}\n      messages: {field}"
        )
    nested = lists[0] if lists else None
    if nested is not None and not spec.records:  # {"version": 1, "data": [records...]}: point into the list
        raise InputError(
            f"{rel}: cannot tell the format of the records; the first record has the keys {', '.join(keys)}, and "
            f"`{nested}` holds a list of objects: if those are the records, say where they are, e.g.\n"
            f"data:\n  inputs:\n    - path: {spec.path}\n      records: \"{nested}[*]\""
        )
    if kind in ("csv", "tsv"):
        raise InputError(
            f"{rel}: a {kind.upper()} file needs a column mapping; its columns are {', '.join(keys)}. "
            f"Say which column is which role in factory.yaml, e.g.\n{example}"
        )
    raise InputError(
        f"{rel}: cannot tell the format of the records; the first record has the keys {', '.join(keys) or '(none)'}. "
        "Expected instruction+output (alpaca), conversations (sharegpt), messages (openai), prompt+completion, "
        "or an OpenAssistant tree; "
        f"otherwise set format or a mapping for this input in factory.yaml under data.inputs, e.g.\n{example}"
    )


def _messages_written_as(turns: Any) -> str | None:
    """sharegpt or openai for a list of {from, value} or {role, content} objects, or openai for a
    Human/Assistant transcript or a list of exchanges, {input, output} (both read by openai());
    else None."""
    if type(turns) is str and re.match(r"\s*Human: ", turns) and "\n\nAssistant: " in turns:
        return "openai"
    if type(turns) is list and turns and type(turns[0]) is dict:
        if "from" in turns[0] and "value" in turns[0]:
            return "sharegpt"
        if "role" in turns[0] and "content" in turns[0] or _pair_fields(turns[0]):
            return "openai"
    return None


# Field names of each role in public instruction data (Dolly, OpenOrca, MetaMathQA, GSM8K,
# SST-2, SQuAD, ...): what `format: auto` reads by name (fields_by_name) and what the mapping
# an error suggests is made of.
ROLE_FIELDS = {
    "system": ("system_prompt", "system"),
    "user": ("instruction", "question", "query", "problem", "prompt", "input", "inputs", "context", "sentence",
             "text", "human", "request"),
    "assistant": ("output", "response", "answer", "answers", "completion", "solution", "target", "targets", "label",
                  "gpt", "reply"),
}


# Names `format: auto` does not read a role from on their own: a label's words are the user's
# choice (label_map), and a text or sentence field may be either side of a task.
NOT_A_ROLE_BY_NAME = ("label", "text", "sentence")


def fields_by_name(records: list[Any]) -> dict[str, Any] | None:
    """The mapping `format: auto` reads records of no named format with, from their field names
    (ROLE_FIELDS but NOT_A_ROLE_BY_NAME): string fields, the user's in the record's order (Dolly:
    instruction, context -> response; MetaMath: query -> response; GSM8K: question -> answer).
    The most common among `records`; None where a record names no answer, several, or no prompt,
    because a guess would train the wrong text."""
    found: Counter = Counter()
    for record in records:
        if type(record) is not dict:
            continue
        roles = _fields_named_as(record, ROLE_FIELDS)
        if len(roles["assistant"]) == 1 and roles["user"] and len(roles["system"]) <= 1:
            found[roles["system"], roles["user"], roles["assistant"][0]] += 1
    if not found:
        return None
    system, user, assistant = max(found, key=found.get)  # the earliest on a tie
    return {**({"system": system[0]} if system else {}), "user": user[0] if len(user) == 1 else list(user),
            "assistant": assistant}


def _fields_named_as(obj: dict, names: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """Per role, the text fields of `obj` with one of its `names` (any case), never one of
    NOT_A_ROLE_BY_NAME, in the record's order."""
    return {role: tuple(k for k, v in obj.items() if type(v) is str and k.lower() in known
                        and k.lower() not in NOT_A_ROLE_BY_NAME) for role, known in names.items()}


def suggested_mapping(record: dict) -> str:
    """A `mapping` for records like this one, in YAML flow style: the known role fields found,
    the user's in the record's order (Dolly: [instruction, context]), each followed down to its
    first text where it holds a list or an object (SQuAD's answers: answers.text[0]); a role
    none of whose known names is there gets a placeholder to replace (a guess would train the
    wrong text)."""
    keys = [str(k) for k in record]
    lower = {k.lower(): k for k in keys}
    assistant = next((lower[f] for f in ROLE_FIELDS["assistant"] if f in lower), None)
    system = next((lower[f] for f in ROLE_FIELDS["system"] if f in lower), None)
    user = [k for k in keys if k.lower() in ROLE_FIELDS["user"] and k not in (assistant, system)]
    shown = [_text_path(record, k) for k in user] or ["PROMPT_FIELD"]
    roles = ([f"system: {_text_path(record, system)}"] if system else []) + [
        f"user: {shown[0] if len(shown) == 1 else '[' + ', '.join(shown) + ']'}",
        f"assistant: {_text_path(record, assistant) if assistant else 'ANSWER_FIELD'}"]
    return "{" + ", ".join(roles) + "}"


def _text_path(record: dict, field: str) -> str:
    """`field`, or a path from it down to the first text inside it: the first element of a
    list, the first field of an object that leads to one (SQuAD's {"answers": {"answer_start":
    [0], "text": ["..."]}} -> answers.text[0])."""
    def first_text(value: Any, path: str, depth: int) -> str | None:
        if isinstance(value, str):
            return path
        if depth == 0:
            return None
        if isinstance(value, list):
            return first_text(value[0], f"{path}[0]", depth - 1) if value else None
        if isinstance(value, dict):
            return next((found for key, item in value.items() if isinstance(key, str) and _PATH_TOKEN.fullmatch(key)
                         and (found := first_text(item, f"{path}.{key}", depth - 1))), None)
        return None

    path = first_text(record.get(field), field, 4) or field
    return path if path.isidentifier() else orjson.dumps(path).decode()  # YAML flow style: [ and ] need quotes


def _check_columns(spec: InputSpec, header_row: dict, kind: str, rel: str) -> None:
    named = [f for _, f in spec.mapped_fields]
    missing = [str(f) for f in named if isinstance(f, str) and f not in header_row]
    missing += [str(f) for f in named if isinstance(f, int) and f >= len(header_row)]
    if missing:
        raise InputError(
            f"{rel}: the mapping names column(s) {', '.join(missing)}, but the {kind.upper()} header has "
            f"{', '.join(map(str, header_row))}; fix data.inputs[].mapping in factory.yaml"
        )


# --- converters: one raw record (a dict) -> a canonical record, or raise Reject ----------


def alpaca(obj: dict) -> dict:
    """Seed 004's convert_to_sharegpt: instruction -> system, input -> user, output -> assistant.

    LLaMA-Factory's extensions are kept, not dropped: a `system` field joins the system turn,
    and `history` ([[user, assistant], ...]) becomes the turns before the last exchange.
    """
    # The common case inline (this runs a million times in the benchmark); anything
    # unusual (missing, empty or non-string fields, system or history) takes the checked path.
    instruction, user, answer = obj.get("instruction"), obj.get("input"), obj.get("output")
    if "system" in obj or "history" in obj:
        return _alpaca_extended(obj)
    if type(answer) is str and type(user) is str and type(instruction) is str and answer and not answer.isspace():
        if user and instruction:
            return {"conversations": [
                {"role": "system", "content": instruction},
                {"role": "user", "content": user},
                {"role": "assistant", "content": answer},
            ]}
        if user or instruction:  # no input: the instruction is the user turn (see single_turn)
            return {"conversations": [{"role": "user", "content": user or instruction}, {"role": "assistant", "content": answer}]}
    return {
        "conversations": single_turn(
            _optional_text(obj, "instruction"),
            _optional_text(obj, "input"),
            _required_text(obj, "output", "Alpaca records need instruction and output"),
            ("instruction", "input", "output"),
        )
    }


def _alpaca_extended(obj: dict) -> dict:
    base = {k: v for k, v in obj.items() if k not in ("system", "history")}
    conversation = alpaca(base)["conversations"]
    system = _optional_text(obj, "system")
    history = obj.get("history") or []
    if type(history) is not list or any(
        type(pair) is not list or len(pair) != 2 or any(type(t) is not str for t in pair) for pair in history
    ):
        raise Reject("wrong_type", "`history` must be a list of [user, assistant] text pairs; fix the record")
    head = conversation[:1] if conversation[0]["role"] == "system" else []
    earlier = [{"role": role, "content": text} for pair in history for role, text in zip(("user", "assistant"), pair)]
    if system:
        head = [{"role": "system", "content": system + ("\n\n" + head[0]["content"] if head else "")}]
    return {"conversations": head + earlier + conversation[len(conversation) - 2:]}


def prompt_completion(obj: dict) -> dict:
    return {
        "conversations": single_turn(
            _optional_text(obj, "system"),
            _required_text(obj, "prompt", "prompt/completion records need both fields"),
            _required_text(obj, "completion", "prompt/completion records need both fields"),
            ("system", "prompt", "completion"),
        )
    }


def mapped(spec: InputSpec) -> Callable[[dict], dict]:
    """Fields (or CSV/TSV/Parquet columns, or paths into nested data) named by `mapping`;
    `label_map` translates the answer."""
    def fields_of(role: str) -> list[Any]:
        value = spec.mapping.get(role)
        return [] if value is None else value if isinstance(value, list) else [value]

    system_fields, user_fields, answer_fields = fields_of("system"), fields_of("user"), fields_of("assistant")
    label_map = spec.label_map
    names = tuple(" + ".join(map(str, f)) for f in (system_fields, user_fields, answer_fields))
    hint = "every record needs the fields named in data.inputs[].mapping"

    def text(obj: dict, fields: list[Any]) -> str:  # an empty field of several (Dolly's context) adds no blank lines
        return "\n\n".join(part for part in (_scalar_text(obj, field, hint) for field in fields) if part.strip())

    def convert(obj: dict) -> dict:
        system = text(obj, system_fields)
        user = text(obj, user_fields)
        answer = text(obj, answer_fields)
        if label_map is None:
            return {"conversations": single_turn(system, user, answer, names)}
        label = label_map.get(answer)
        if label is None:
            known = ", ".join(sorted(label_map))
            raise Reject("unmapped_label", f"`{names[2]}` is {answer!r}, which is not in label_map ({known}); "
                                           "add it to data.inputs[].label_map or fix the record")
        return {"conversations": single_turn(system, user, label, names), "meta": {"label": _mapped_value(obj, answer_fields[0])}}

    return convert


def _mapped_value(obj: dict, field: Any) -> Any:
    """A mapped field's value: inside the current list element for `list[*].rest` fields."""
    if isinstance(field, str) and "[*]" in field and _ELEMENT in obj:
        rest = field.split("[*]", 1)[1].lstrip(".")
        return get_field(obj[_ELEMENT], rest) if rest else obj[_ELEMENT]
    return get_field(obj, field)


def single_turn(system: str, user: str, answer: str, names: tuple[str, str, str]) -> list[dict]:
    """[system?, user, assistant] from three texts; `names` are the source fields, for messages."""
    if not answer or answer.isspace():
        raise Reject("empty_assistant", f"`{names[2]}` is empty; the answer is what the model learns, so fill it or remove the record")
    if not user:
        if not system:
            raise Reject("missing_field", f"`{names[1] or names[0]}` is empty; the record has no prompt, so fill it or remove the record")
        # With no input, seed 004's conversion gives [system, assistant]: no user turn, and
        # Gemma's chat template raises "Conversation roles must alternate user/assistant/...".
        # The instruction (or system field) is the request then, so it becomes the user turn.
        return [{"role": "user", "content": system}, {"role": "assistant", "content": answer}]
    if system:
        return [
            {"role": "system", "content": system},
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def sharegpt(obj: dict, field: str = "conversations") -> dict:
    """conversations [{from, value}] (role/content also accepted), optional system and tools."""
    turns = _turn_list(obj, field, f"ShareGPT records need {field}: [{{from, value}}, ...]")
    conversation = []
    system = _optional_text(obj, "system")
    if system:
        conversation.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        if type(turn) is not dict:
            raise Reject("wrong_type", f"{field}[{i}] is a JSON {_json_type(turn)}, not {{from, value}}; fix the record")
        speaker = turn.get("from", turn.get("role"))
        role = SHAREGPT_ROLES.get(speaker) if type(speaker) is str else None
        if role is None:
            raise Reject("unknown_role", f"{field}[{i}].from is {speaker!r}; use one of {', '.join(SHAREGPT_ROLES)}")
        content = turn.get("value", turn.get("content"))
        if type(content) is not str:
            raise _bad_text(f"{field}[{i}].value", content)
        conversation.append({"role": role, "content": content})
    record = _with_tools({"conversations": check_order(conversation, field)}, obj.get("tools"))
    if "label" in obj:
        record["meta"] = {"label": obj["label"]}
    return record


def openai(obj: dict, field: str = "messages") -> dict:
    """messages [{role, content}]; content may be a list of text parts; an extra `label` (KTO)
    goes to meta."""
    if type(obj.get(field)) is str and field != "messages":  # a Human/Assistant transcript (Anthropic's HH)
        obj = {**obj, field: _transcript_turns(obj[field], field)}
    turns = _turn_list(obj, field, f"OpenAI records need {field}: [{{role, content}}, ...]")
    conversation = []
    for i, turn in enumerate(turns):
        if type(turn) is not dict:
            raise Reject("wrong_type", f"{field}[{i}] is a JSON {_json_type(turn)}, not {{role, content}}; fix the record")
        role = OPENAI_ROLES.get(turn.get("role")) if type(turn.get("role")) is str else None
        if role is None:
            raise Reject("unknown_role", f"{field}[{i}].role is {turn.get('role')!r}; use one of {', '.join(OPENAI_ROLES)}")
        content = turn.get("content")
        if type(content) is not str:
            content = _openai_content(content, turn, f"{field}[{i}].content")
        conversation.append({"role": role, "content": content})
    record = _with_tools({"conversations": check_order(conversation, field)}, obj.get("tools"))
    if "label" in obj:
        record["meta"] = {"label": obj["label"]}
    return record


TOOLS_PREAMBLE = "You have access to the following functions:"


def _with_tools(record: dict, tools: Any) -> dict:
    """The record with its tool definitions (ShareGPT's `tools`, OpenAI's) kept as given and
    written into its system turn: a model trained to call functions must see the definitions
    it calls, and the system turn reaches every template, the GGUF and any chat endpoint alike
    (LLaMA-Factory writes them there too)."""
    if tools in (None, "", []):
        return record
    try:
        parsed = orjson.loads(tools) if type(tools) is str else tools
    except orjson.JSONDecodeError:
        parsed = tools
    listed = parsed if type(parsed) is str else orjson.dumps(parsed).decode()
    turns = record["conversations"]
    if turns[0]["role"] == "system":
        turns[0] = {"role": "system", "content": f"{turns[0]['content']}\n\n{TOOLS_PREAMBLE}\n{listed}"}
    else:
        turns.insert(0, {"role": "system", "content": f"{TOOLS_PREAMBLE}\n{listed}"})
    return {**record, "tools": tools}


_TRANSCRIPT_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant): ")
TRANSCRIPT_ROLES = {"Human": "user", "Assistant": "assistant"}


def _transcript_turns(text: str, field: str) -> list[dict]:
    """`\n\nHuman: ...\n\nAssistant: ...` (Anthropic's hh-rlhf) as messages."""
    parts = _TRANSCRIPT_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise Reject("wrong_type", f"`{field}` is text that is not a transcript of `Human: ` and `Assistant: ` turns "
                                   "each after a blank line; fix the record or name another field")
    return [{"role": TRANSCRIPT_ROLES[speaker], "content": content.strip()}
            for speaker, content in zip(parts[1::2], parts[2::2])]


def _openai_content(content: Any, turn: dict, field: str) -> str:
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        texts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        if texts and all(type(t) is str for t in texts):
            return "".join(texts)
    if content is None and turn.get("tool_calls"):  # an assistant function call
        return orjson.dumps(turn["tool_calls"]).decode()
    raise _bad_text(field, content)


def oasst_tree(paths: str) -> Callable[[dict], list[dict]]:
    """An OpenAssistant message tree (`{message_tree_id, prompt: {role, text, replies: [...]}}`,
    or the root message itself): `best` follows the reply ranked best (lowest `rank`, unranked
    last) at every turn, `all` gives every root-to-leaf path. Deleted messages and messages that
    failed review are left out; a path ends at its last assistant message."""

    def usable(message: Any) -> bool:
        return isinstance(message, dict) and not message.get("deleted") and message.get("review_result") is not False

    def walk(message: dict, path: list[dict]) -> Iterator[list[dict]]:
        path = path + [message]
        replies = [r for r in message.get("replies") or [] if usable(r)]
        if paths == "best" and replies:
            replies = [min(replies, key=lambda r: (r.get("rank") is None, r.get("rank") or 0))]
        if not replies:
            yield path
        for reply in replies:
            yield from walk(reply, path)

    def convert(obj: dict) -> list[dict]:
        root = obj.get("prompt") if isinstance(obj.get("prompt"), dict) else obj
        if not isinstance(root.get("text"), str) or root.get("role") not in OASST_ROLES:
            raise Reject("missing_field", "an OpenAssistant tree needs `prompt` (or a root message) with `role` and "
                                          "`text`; fix the record")
        if not usable(root):
            raise Reject("empty_record", "the tree's first message is deleted or failed review")
        records, seen = [], set()
        for path in walk(root, []):
            while path and path[-1].get("role") != "assistant":
                path = path[:-1]
            key = tuple(id(m) for m in path)
            if len(path) < 2 or key in seen:
                continue
            seen.add(key)
            turns = []
            for i, message in enumerate(path):
                role, text = OASST_ROLES.get(message.get("role")), message.get("text")
                if role is None:
                    raise Reject("unknown_role", f"message {i} of a path has role {message.get('role')!r}; "
                                                 "use prompter or assistant")
                if type(text) is not str:
                    raise _bad_text(f"message {i}.text", text)
                turns.append({"role": role, "content": text})
            records.append({"conversations": check_order(turns, "the message path")})
        if not records:
            raise Reject("empty_assistant", "the tree has no assistant reply to its prompt; remove it")
        return records

    return convert


def text_document(text: str) -> dict:
    if not text or text.isspace():
        raise Reject("empty_record", "the file has no text; remove it or fill it")
    return {"conversations": [{"role": "assistant", "content": text}]}


def text_field(obj: dict) -> dict:
    """{"text": ...} records: a plain-text corpus in JSONL."""
    text = obj.get("text")
    if type(text) is not str:
        raise _bad_text("text", text)
    if not text or text.isspace():
        raise Reject("empty_record", "`text` is empty; remove the record or fill it")
    return {"conversations": [{"role": "assistant", "content": text}]}


def with_prompts(convert: Callable[[Any], dict], system_prompt: str | None, user_template: str | None) -> Callable[[Any], dict]:
    """Apply an input's system_prompt (a first system turn; put before a record's own system
    text) and user_template ("{text}" replaced by each user turn's text)."""

    def convert_with_prompts(item: Any) -> Any:
        result = convert(item)
        for record in result if type(result) is list else [result]:
            add_prompts(record["conversations"])
        return result

    def add_prompts(conversation: list[dict]) -> None:
        if user_template:
            for turn in conversation:
                if turn["role"] == "user":
                    turn["content"] = user_template.replace("{text}", turn["content"])
        if system_prompt:
            if conversation[0]["role"] == "system":
                conversation[0]["content"] = f"{system_prompt}\n\n{conversation[0]['content']}"
            else:
                conversation.insert(0, {"role": "system", "content": system_prompt})

    return convert_with_prompts


def with_meta(convert: Callable[[Any], Any], fields: list[Any]) -> Callable[[Any], Any]:
    """Keep an input's `meta` fields of each source record in the meta of what it converts to."""

    def convert_with_meta(item: Any) -> Any:
        result = convert(item)
        kept = {str(field): value for field in fields if (value := _mapped_value(item, field)) is not None}
        if kept:
            for record in result if type(result) is list else [result]:
                record["meta"] = {**kept, **record.get("meta", {})}
        return result

    return convert_with_meta


# --- validation helpers ------------------------------------------------------------------


def check_order(conversation: list[dict], field: str) -> list[dict]:
    """Multi-turn records: the role order and a non-empty final answer. (Single-turn converters
    build a valid order by construction and check the answer themselves.)"""
    if not conversation:
        raise Reject("empty_record", f"`{field}` is empty; remove the record")
    roles = "".join([turn["role"][0] for turn in conversation])
    if not CHAT_ORDER.fullmatch(roles):
        order = ", ".join(turn["role"] for turn in conversation)
        raise Reject("role_order", f"`{field}` roles go {order}; {EXPECTED_ORDER}; fix or remove the record")
    answer = conversation[-1]["content"]
    if not answer or answer.isspace():
        raise Reject("empty_assistant", f"the last assistant turn of `{field}` is empty; fill it or remove the record")
    return conversation


def _turn_list(obj: dict, field: str, hint: str) -> list:
    turns = obj.get(field)
    if turns is None:
        raise Reject("missing_field", f"no `{field}` field; {hint}")
    if type(turns) is not list:
        raise Reject("wrong_type", f"`{field}` is a JSON {_json_type(turns)}, not a list; {hint}")
    return _pairs_as_messages(turns, field) if turns and _pair_fields(turns[0]) else turns


EXCHANGE_FIELDS = {role: (*ROLE_FIELDS[role], role) for role in ("user", "assistant")}
"""The names of an exchange's prompt and answer: ROLE_FIELDS', and `user` and `assistant`
themselves (inside a conversation they cannot be a user's name or id)."""


def _pair_fields(turn: Any) -> tuple[str, str] | None:
    """The (prompt, answer) fields of a turn written as an exchange, {input, output} (Capybara),
    {user, assistant}, or any one prompt and one answer field of ROLE_FIELDS with text, or None."""
    if type(turn) is not dict or "role" in turn or "from" in turn:
        return None
    named = _fields_named_as(turn, EXCHANGE_FIELDS)
    return (named["user"][0], named["assistant"][0]) if len(named["user"]) == len(named["assistant"]) == 1 else None


def _pairs_as_messages(turns: list, field: str) -> list[dict]:
    """A conversation written as exchanges, [{input, output}, ...], as user and assistant messages."""
    messages = []
    for i, turn in enumerate(turns):
        fields = _pair_fields(turn)
        if fields is None:
            raise Reject("wrong_type", f"{field}[{i}] is not an exchange of a prompt and an answer field with text, "
                                       f"as {field}[0] is; fix or remove the record")
        messages += [{"role": "user", "content": turn[fields[0]]}, {"role": "assistant", "content": turn[fields[1]]}]
    return messages


def _optional_text(obj: dict, field: str) -> str:
    value = obj.get(field)
    if value is None:
        return ""
    if type(value) is not str:
        raise _bad_text(field, value)
    return value


def _required_text(obj: dict, field: str, hint: str) -> str:
    value = obj.get(field)
    if type(value) is str:
        return value
    if value is None:
        raise Reject("missing_field", f"no `{field}` field; {hint}")
    raise _bad_text(field, value)


def _scalar_text(obj: dict, field: Any, hint: str) -> str:
    """A mapped field: text, or a number/boolean written as JSON (a label such as 0 or true)."""
    value = _mapped_value(obj, field)
    if type(value) is str:
        return value
    if value is None:
        raise Reject("missing_field", f"no `{field}` field; {hint}")
    if isinstance(value, (int, float)):
        return orjson.dumps(value).decode()
    raise _bad_text(field, value)


def _bad_text(field: str, value: Any) -> Reject:
    if value is None:
        return Reject("missing_field", f"no `{field}`; every turn needs its text")
    return Reject("wrong_type", f"`{field}` is a JSON {_json_type(value)}; it must be a string of text")


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


PHASE = Phase(
    name="format",
    summary="Read data.inputs (Alpaca, ShareGPT, OpenAI, prompt/completion, OpenAssistant trees, mapped "
    "JSON/CSV/TSV/Parquet, text) "
    "and write canonical conversations to data/formatted/all.jsonl; bad records to rejects.jsonl",
    metrics="format",
    run=run,
    config_sections=("data",),
    inputs=_input_paths,
    outputs=_outputs,
)
