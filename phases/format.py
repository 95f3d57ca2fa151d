"""format: read the raw data in whatever shape it came, write one canonical record per line.

Reads every file of every `data.inputs` entry (a file, or a folder read recursively in sorted
order; hidden files skipped), converts each record to the canonical form of
schemas/record.schema.json

    {"conversations": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...],
     "tools": ... (ShareGPT tool definitions, as given), "meta": {...} (e.g. the raw label)}

and writes data/formatted/all.jsonl. Every record that cannot be converted goes to
data/formatted/rejects.jsonl with its file, line (or array index), a reason code, a sentence
saying what to fix, and the start of the raw text. Nothing is dropped silently:
records_in == records_out + rejected (blank lines are not records).

Input shapes (`format`, per input; `auto` decides per file from the extension and the keys of
the first record):
  alpaca             instruction / input / output
  sharegpt           conversations [{from, value}], optional tools and system
  openai             messages [{role, content}]
  prompt_completion  prompt / completion
  mapped             any field (JSON) or column (CSV/TSV) names, through `mapping`
  text               each .txt file is one document (a single assistant turn)

Files are streamed: JSONL/CSV/TSV line by line, JSON arrays item by item with ijson. Only a
.txt document (one record) or a single top-level JSON object is read whole.
"""

from __future__ import annotations

import csv
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import ijson
import orjson

from factory.config import FactoryConfig, InputSpec
from factory.errors import InputError
from factory.io import AtomicOutput, csv_field_size_limit
from factory.phase import Phase, PhaseContext
from factory.workspace import Workspace

EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".txt")
BATCH = 5000  # records between writes and progress updates
RAW_CHARS = 300  # how much of a rejected record's text goes to rejects.jsonl
BOM = b"\xef\xbb\xbf"
ADD_NEWLINE = orjson.OPT_APPEND_NEWLINE
NO_INPUT_FIX = "put .jsonl/.json/.csv/.tsv/.txt files in data/raw/ or set data.inputs in factory.yaml"

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
    "tool": "tool",
    "function": "tool",
}


class Reject(Exception):
    """One record that cannot be converted: a reason code and a sentence saying what to fix."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# --- the phase ---------------------------------------------------------------------------


def run(ctx: PhaseContext) -> dict[str, Any]:
    started = time.perf_counter()
    ws = ctx.workspace
    files, skipped = collect_files(ctx.config.data.inputs, ws)
    if not files:
        raise InputError(f"no input files found in {_input_paths(ctx.config, ws)}; {NO_INPUT_FIX}")

    ctx.progress.start(None, "records")
    per_file: dict[str, dict[str, Any]] = {}
    with AtomicOutput(ws.formatted_file) as out, AtomicOutput(ws.rejects_file) as rejects:
        for path, spec in files:
            rel = ws.rel(path)
            per_file[rel] = format_file(path, rel, spec, out, rejects, ctx.progress)
            ctx.log.debug("format: %s: %s", rel, per_file[rel])
        records_in = sum(stats["records_in"] for stats in per_file.values())
        if records_in == 0:
            # Raised inside the `with`, so neither output file is written.
            raise InputError(f"no records found in {', '.join(per_file)}; {NO_INPUT_FIX}")

    records_out = sum(stats["records_out"] for stats in per_file.values())
    per_reason: Counter = Counter()
    for stats in per_file.values():
        per_reason.update(stats["reasons"])
        stats["reasons"] = dict(sorted(stats["reasons"].items()))
    rejected = records_in - records_out
    ctx.log.info("format: %d records in, %d out, %d rejected", records_in, records_out, rejected)
    return {
        "records_in": records_in,
        "records_out": records_out,
        "rejected": rejected,
        "rejected_ratio": round(rejected / records_in, 6) if records_in else 0,
        "per_file": per_file,
        "per_reason": dict(sorted(per_reason.items())),
        "skipped_files": skipped,
        "output": ws.rel(ws.formatted_file),
        "output_sha256": out.sha256.hexdigest(),
        "rejects": ws.rel(ws.rejects_file),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _input_paths(cfg: FactoryConfig, ws: Workspace) -> list[Path]:
    return [ws.path(spec.path) for spec in cfg.data.inputs]


def _outputs(cfg: FactoryConfig, ws: Workspace) -> list[Path]:
    return [ws.formatted_file, ws.rejects_file]


# --- finding the files -------------------------------------------------------------------


def collect_files(inputs: list[InputSpec], ws: Workspace) -> tuple[list[tuple[Path, InputSpec]], list[str]]:
    """(file, its input spec) in a stable order, and the files skipped for their extension."""
    files: list[tuple[Path, InputSpec]] = []
    skipped: list[str] = []
    seen: set[Path] = set()
    # A folder input such as `data` must not read this phase's or split's own outputs.
    own_outputs = {ws.formatted_dir.resolve(), ws.splits_dir.resolve()}
    for i, spec in enumerate(inputs):
        root = ws.path(spec.path)
        if not root.exists():
            raise InputError(
                f"data.inputs[{i}].path: {ws.rel(root)} does not exist; {NO_INPUT_FIX} (or fix the path)"
            )
        if root.is_file():
            if root.suffix.lower() not in EXTENSIONS:
                raise InputError(
                    f"data.inputs[{i}].path: {ws.rel(root)} is not a .jsonl, .json, .csv, .tsv or .txt file; "
                    "convert it or point data.inputs at a supported file"
                )
            candidates = [root]
        else:
            candidates = _walk(root, own_outputs)
        for path in candidates:
            if path.suffix.lower() not in EXTENSIONS:
                skipped.append(ws.rel(path))
                continue
            key = path.resolve()
            if key not in seen:  # overlapping inputs: the first one that names a file reads it
                seen.add(key)
                files.append((path, spec))
    return files, skipped


def _walk(root: Path, excluded: set[Path]) -> list[Path]:
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and (Path(folder) / d).resolve() not in excluded]
        found.extend(Path(folder) / name for name in names if not name.startswith("."))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


# --- one file ----------------------------------------------------------------------------


def format_file(path: Path, rel: str, spec: InputSpec, out: AtomicOutput, rejects: AtomicOutput, progress) -> dict:
    """Convert one file, appending to the output and rejects files; return its statistics."""
    kind = path.suffix.lower()[1:]  # jsonl, json, csv, tsv, txt
    stats: dict[str, Any] = {"format": None, "records_in": 0, "records_out": 0, "rejected": 0, "reasons": Counter()}
    location = {"jsonl": "line", "csv": "line", "tsv": "line", "json": "index"}.get(kind)
    delimiter = "\t" if kind == "tsv" else ","

    def reject(loc: int | None, reason: str, detail: str, raw: Any) -> None:
        entry: dict[str, Any] = {"file": rel}
        if location is not None:
            entry[location] = loc
        entry.update(reason=reason, detail=detail, raw=_raw_text(raw, delimiter))
        rejects.write(orjson.dumps(entry, option=ADD_NEWLINE))
        stats["rejected"] += 1
        stats["reasons"][reason] += 1

    with open(path, "rb") as f, csv_field_size_limit():  # long documents in one cell are fine
        if f.read(3) != BOM:
            f.seek(0)
        if kind == "jsonl":
            items = jsonl_items(f)
        elif kind == "json":
            items = json_items(f, path)
        elif kind in ("csv", "tsv"):
            items = csv_items(f, kind, reject)
        else:
            items = text_items(f)
        expected = str if kind == "txt" else dict

        convert: Callable[[Any], dict] | None = None
        lines: list[bytes] = []
        dumps = orjson.dumps
        for loc, item, raw in items:
            try:
                if type(item) is not expected:
                    raise item if type(item) is Reject else _not_an_object(item)
                if convert is None:
                    stats["format"], convert = choose_converter(spec, kind, item, rel)
                lines.append(dumps(convert(item), None, ADD_NEWLINE))
            except Reject as problem:
                reject(loc, problem.reason, problem.detail, raw)
                continue
            if len(lines) >= BATCH:
                _flush(lines, out, stats, progress)
        _flush(lines, out, stats, progress)

    progress.advance(stats["rejected"])
    stats["records_in"] = stats["records_out"] + stats["rejected"]
    if stats["format"] is None:  # nothing convertible was read
        stats["format"] = "text" if kind == "txt" else spec.format
    return stats


def _flush(lines: list[bytes], out: AtomicOutput, stats: dict, progress) -> None:
    if lines:
        out.write(b"".join(lines))
        stats["records_out"] += len(lines)
        progress.advance(len(lines))
        lines.clear()


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
        text = orjson.dumps(raw).decode()
    return text.rstrip("\r\n")[:RAW_CHARS]


# --- readers: yield (line or index, record or Reject, raw text) ---------------------------


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


def json_items(f, path: Path) -> Iterator[tuple[int, Any, Any]]:
    """A JSON array, item by item; a top-level object is one record (several objects one after
    another, JSONL saved as .json, are read in turn). The location is the 0-based index."""
    first = _first_non_space(f)
    if first is None:
        return
    array = first == b"["
    index = 0
    try:
        for record in ijson.items(f, "item" if array else "", use_float=True, multiple_values=not array):
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
                f"the {index} records before it were kept; restore the end of the file",
            ), _file_tail(path)
        else:
            yield index, Reject(
                "invalid_json",
                f"the JSON breaks at record {index} ({headline.strip()}); the {index} records before it "
                "were kept, nothing after it could be read; fix the file there",
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


def csv_items(f, kind: str, reject: Callable) -> Iterator[tuple[int, Any, Any]]:
    """CSV/TSV rows as {header: value}. The first row is the header. Lines are decoded one by
    one, so an undecodable line is one reject; csv.reader reads from those lines, so quoted
    fields spanning lines still work in CSV. TSV has no quoting (a `"` is an ordinary
    character, as in GLUE's files)."""
    where = {"first_line": 0}  # first physical line of the row being read

    def decoded_lines() -> Iterator[str]:
        for lineno, line in enumerate(f, 1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                reject(lineno, "undecodable", f"the line is not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1}); re-save the file as UTF-8", line)
                continue
            if not where["first_line"]:
                where["first_line"] = lineno
            yield text

    if kind == "tsv":
        reader = csv.reader(decoded_lines(), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(decoded_lines())
    header: list[str] | None = None
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield where["first_line"], Reject("invalid_csv", f"the row cannot be read as {kind.upper()} ({e}); fix its quoting"), ""
            where["first_line"] = 0
            continue
        line, where["first_line"] = where["first_line"], 0
        if not row:  # a blank line
            continue
        if header is None:
            header = [name.strip() for name in row]
            continue
        if len(row) > len(header) and any(cell.strip() for cell in row[len(header):]):
            yield line, Reject(
                "wrong_type",
                f"the row has {len(row)} fields but the header has {len(header)} columns; "
                "quote fields that contain the delimiter",
            ), row
            continue
        if len(row) < len(header):  # a short row: its missing columns are missing fields
            yield line, dict(zip(header, row + [None] * (len(header) - len(row)))), row
            continue
        yield line, dict(zip(header, row)), row


def text_items(f) -> Iterator[tuple[None, Any, Any]]:
    """A .txt file is one document, read whole (it is one record)."""
    data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        yield None, Reject("undecodable", f"the file is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); re-save it as UTF-8"), data
        return
    yield None, text.replace("\r\n", "\n"), text


# --- choosing a converter ----------------------------------------------------------------


def choose_converter(spec: InputSpec, kind: str, first: Any, rel: str) -> tuple[str, Callable[[Any], dict]]:
    """The format name and the function for this file, from the spec and its first record."""
    fmt = spec.format
    if kind == "txt":
        if fmt not in ("auto", "text"):
            raise InputError(f"{rel}: a .txt file is read as one plain-text document (format text), not as {fmt}; "
                             "save the records as .jsonl or set format: text for this input")
        fmt, convert = "text", text_document
    else:
        if fmt == "auto":
            fmt = detect_format(first, spec, kind, rel)
        if fmt == "mapped" and kind in ("csv", "tsv"):
            _check_columns(spec, first, kind, rel)
        convert = {
            "alpaca": alpaca,
            "sharegpt": sharegpt,
            "openai": openai,
            "prompt_completion": prompt_completion,
            "text": text_field,
        }.get(fmt) or mapped(spec)
    if spec.system_prompt or spec.user_template:
        convert = with_prompts(convert, spec.system_prompt, spec.user_template)
    return fmt, convert


def detect_format(first: dict, spec: InputSpec, kind: str, rel: str) -> str:
    if spec.mapping:
        return "mapped"
    if "instruction" in first and "output" in first:
        return "alpaca"
    if "conversations" in first:
        return "sharegpt"
    if "messages" in first:
        return "openai"
    if "prompt" in first and "completion" in first:
        return "prompt_completion"
    if type(first.get("text")) is str and kind not in ("csv", "tsv"):
        return "text"
    keys = list(first)
    if kind in ("csv", "tsv"):
        raise InputError(
            f"{rel}: a {kind.upper()} file needs a column mapping; its columns are {', '.join(keys)}. "
            f"Say which column is which role in factory.yaml, e.g.\n"
            f"data:\n  inputs:\n    - path: {spec.path}\n      mapping: {{user: {keys[0]}, assistant: {keys[-1]}}}"
        )
    raise InputError(
        f"{rel}: cannot tell the format of the records; the first record has the keys {', '.join(keys) or '(none)'}. "
        "Expected instruction+output (alpaca), conversations (sharegpt), messages (openai) or prompt+completion; "
        f"otherwise set format or a mapping for this input in factory.yaml under data.inputs, e.g.\n"
        f"data:\n  inputs:\n    - path: {spec.path}\n      mapping: {{user: {keys[0] if keys else 'question'}, "
        f"assistant: {keys[-1] if keys else 'answer'}}}"
    )


def _check_columns(spec: InputSpec, header_row: dict, kind: str, rel: str) -> None:
    missing = [column for column in spec.mapping.values() if column not in header_row]
    if missing:
        raise InputError(
            f"{rel}: the mapping names column(s) {', '.join(missing)}, but the {kind.upper()} header has "
            f"{', '.join(header_row)}; fix data.inputs[].mapping in factory.yaml"
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
    """Fields (or CSV/TSV columns) named by `mapping`; `label_map` translates the answer."""
    system_field = spec.mapping.get("system")
    user_field = spec.mapping.get("user")
    answer_field = spec.mapping["assistant"]
    label_map = spec.label_map
    names = (system_field or "", user_field or "", answer_field)
    hint = "every record needs the fields named in data.inputs[].mapping"

    def convert(obj: dict) -> dict:
        system = _scalar_text(obj, system_field, hint) if system_field else ""
        user = _scalar_text(obj, user_field, hint) if user_field else ""
        answer = _scalar_text(obj, answer_field, hint)
        if label_map is None:
            return {"conversations": single_turn(system, user, answer, names)}
        label = label_map.get(answer)
        if label is None:
            known = ", ".join(sorted(label_map))
            raise Reject("unmapped_label", f"`{answer_field}` is {answer!r}, which is not in label_map ({known}); "
                                           "add it to data.inputs[].label_map or fix the record")
        return {"conversations": single_turn(system, user, label, names), "meta": {"label": obj[answer_field]}}

    return convert


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


def sharegpt(obj: dict) -> dict:
    """conversations [{from, value}] (role/content also accepted), optional system and tools."""
    turns = _turn_list(obj, "conversations", "ShareGPT records need conversations: [{from, value}, ...]")
    conversation = []
    system = _optional_text(obj, "system")
    if system:
        conversation.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        if type(turn) is not dict:
            raise Reject("wrong_type", f"conversations[{i}] is a JSON {_json_type(turn)}, not {{from, value}}; fix the record")
        speaker = turn.get("from", turn.get("role"))
        role = SHAREGPT_ROLES.get(speaker) if type(speaker) is str else None
        if role is None:
            raise Reject("unknown_role", f"conversations[{i}].from is {speaker!r}; use one of {', '.join(SHAREGPT_ROLES)}")
        content = turn.get("value", turn.get("content"))
        if type(content) is not str:
            raise _bad_text(f"conversations[{i}].value", content)
        conversation.append({"role": role, "content": content})
    record = {"conversations": check_order(conversation, "conversations")}
    tools = obj.get("tools")
    if tools not in (None, "", []):
        record["tools"] = tools
    if "label" in obj:
        record["meta"] = {"label": obj["label"]}
    return record


def openai(obj: dict) -> dict:
    """messages [{role, content}]; content may be a list of text parts; an extra `label` (KTO)
    goes to meta."""
    turns = _turn_list(obj, "messages", "OpenAI records need messages: [{role, content}, ...]")
    conversation = []
    for i, turn in enumerate(turns):
        if type(turn) is not dict:
            raise Reject("wrong_type", f"messages[{i}] is a JSON {_json_type(turn)}, not {{role, content}}; fix the record")
        role = OPENAI_ROLES.get(turn.get("role")) if type(turn.get("role")) is str else None
        if role is None:
            raise Reject("unknown_role", f"messages[{i}].role is {turn.get('role')!r}; use one of {', '.join(OPENAI_ROLES)}")
        content = turn.get("content")
        if type(content) is not str:
            content = _openai_content(content, turn, f"messages[{i}].content")
        conversation.append({"role": role, "content": content})
    record = {"conversations": check_order(conversation, "messages")}
    if "tools" in obj and obj["tools"] not in (None, "", []):
        record["tools"] = obj["tools"]
    if "label" in obj:
        record["meta"] = {"label": obj["label"]}
    return record


def _openai_content(content: Any, turn: dict, field: str) -> str:
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        texts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        if texts and all(type(t) is str for t in texts):
            return "".join(texts)
    if content is None and turn.get("tool_calls"):  # an assistant function call
        return orjson.dumps(turn["tool_calls"]).decode()
    raise _bad_text(field, content)


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

    def convert_with_prompts(item: Any) -> dict:
        record = convert(item)
        conversation = record["conversations"]
        if user_template:
            for turn in conversation:
                if turn["role"] == "user":
                    turn["content"] = user_template.replace("{text}", turn["content"])
        if system_prompt:
            if conversation[0]["role"] == "system":
                conversation[0]["content"] = f"{system_prompt}\n\n{conversation[0]['content']}"
            else:
                conversation.insert(0, {"role": "system", "content": system_prompt})
        return record

    return convert_with_prompts


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
    return turns


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


def _scalar_text(obj: dict, field: str, hint: str) -> str:
    """A mapped field: text, or a number/boolean written as JSON (a label such as 0 or true)."""
    value = obj.get(field)
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
    summary="Read data.inputs (Alpaca, ShareGPT, OpenAI, prompt/completion, mapped JSON/CSV/TSV, text) "
    "and write canonical conversations to data/formatted/all.jsonl; bad records to rejects.jsonl",
    metrics="format",
    run=run,
    config_sections=("data",),
    inputs=_input_paths,
    outputs=_outputs,
)
