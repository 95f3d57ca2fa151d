"""The split phase on real files: de-duplication, exact ratios, prompt groups that never
cross splits, stratification, leakage measured from the written files, determinism, and
the errors a user can meet. No mocks: each test writes data/formatted/all.jsonl and runs
the phase."""

import json
import logging
import subprocess
import sys
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import orjson
import pytest
import xxhash

from brute_force import near_pairs_across_splits
from factory.config import parse_config
from factory.errors import InputError
from factory.phase import PhaseContext
from factory.workspace import Workspace
from phases import split
from phases.split import PHASE, SPLITS


class Progress:
    def __init__(self):
        self.starts, self.done = [], 0

    def start(self, total, unit):
        self.starts.append((total, unit))

    def advance(self, n=1):
        self.done += n


def record(user, answer, system=None, meta=None):
    turns = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer},
    ]
    rec = {"conversations": turns}
    if meta is not None:
        rec["meta"] = meta
    return rec


def write_input(ws, records, dumps=orjson.dumps):
    ws.formatted_file.parent.mkdir(parents=True, exist_ok=True)
    with open(ws.formatted_file, "wb") as f:
        for rec in records:
            f.write(rec if isinstance(rec, bytes) else dumps(rec) + b"\n")


def run(ws, data=None, **kwargs):
    cfg = parse_config({"data": data or {}})
    ctx = PhaseContext(cfg, ws, Progress(), logging.getLogger("test.split"))
    return split.split_records(ctx, **kwargs) if kwargs else PHASE.run(ctx)


def run_cli(root):
    """`factory run split` (format, then split, with their gates) in a subprocess, as a user
    types it; the workspace, once it exited 0."""
    proc = subprocess.run([sys.executable, "-m", "factory", "run", "split", "-C", str(root)], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return Workspace.at(root)


def outputs(ws):
    """{split: [parsed record, ...]} read back from data/splits/."""
    return {name: [orjson.loads(line) for line in ws.split_file(name).read_bytes().splitlines()] for name in SPLITS}


def prompt_of(rec):
    return json.dumps(rec["conversations"][:-1], sort_keys=True)


@pytest.fixture
def ws(tmp_path):
    return Workspace.at(tmp_path)


def unique_records(n, prefix="question"):
    return [record(f"{prefix} number {i}: what is {i} plus {i}?", f"The answer is {2 * i}.") for i in range(n)]


def test_exact_ratios_and_metrics(ws):
    write_input(ws, unique_records(100))
    m = run(ws)
    assert m["records_in"] == m["records_out"] == m["groups"] == 100
    assert m["counts"] == {"train": 80, "val": 10, "test": 10}
    assert m["ratios_actual"] == {"train": 0.8, "val": 0.1, "test": 0.1}
    assert m["leakage"]["total"] == 0
    got = outputs(ws)
    assert {k: len(v) for k, v in got.items()} == m["counts"]
    for name in SPLITS:
        data = ws.split_file(name).read_bytes()
        assert m["files"][name] == {"path": f"data/splits/{name}.jsonl", "records": len(got[name]),
                                     "xxh3_128": xxhash.xxh3_128(data).hexdigest()}


def test_lines_are_copied_unchanged_in_input_order(ws):
    records = unique_records(50)
    write_input(ws, records)
    run(ws)
    source = ws.formatted_file.read_bytes().splitlines()
    position = {line: i for i, line in enumerate(source)}
    written = []
    for name in SPLITS:
        lines = ws.split_file(name).read_bytes().splitlines()
        assert all(line in position for line in lines)
        assert [position[line] for line in lines] == sorted(position[line] for line in lines)
        written += lines
    assert sorted(written) == sorted(source)


def test_same_seed_same_bytes_other_seed_other_split(tmp_path):
    records = unique_records(300)
    digests = []
    for i, seed in enumerate((7, 7, 8)):
        ws = Workspace.at(tmp_path / str(i))
        write_input(ws, records)
        m = run(ws, {"split": {"seed": seed}})
        digests.append({name: m["files"][name]["xxh3_128"] for name in SPLITS})
    assert digests[0] == digests[1]
    assert digests[0]["test"] != digests[2]["test"]


def test_assignment_does_not_depend_on_input_order(tmp_path):
    """The same records in another order, in blocks of 2 KB: the same splits. Some records
    have an exact duplicate, side by side in one order (one block) and far apart in the
    other, and some share a prompt with another answer."""
    import random

    records = unique_records(200)
    records += [records[k] for k in range(0, 200, 10)]  # far apart from their originals
    records += [record(records[k]["conversations"][0]["content"], f"Another answer {k}.") for k in range(5, 200, 25)]
    shuffled = records[:]
    random.Random(7).shuffle(shuffled)
    adjacent = [r for k, r in enumerate(records[:200]) for _ in range(2 if k % 10 == 0 else 1)] + records[220:]
    found = []
    for i, order in enumerate((records, records[::-1], shuffled, adjacent)):
        ws = Workspace.at(tmp_path / str(i))
        write_input(ws, order)
        m = run(ws, chunk_bytes=2 << 10)
        assert m["duplicates_exact"] == 20
        found.append({name: sorted(map(json.dumps, recs)) for name, recs in outputs(ws).items()})
    assert all(f == found[0] for f in found[1:])


def test_exact_and_normalized_duplicates_are_dropped_and_counted(ws):
    base = unique_records(40)
    long_answer = "Step one: mix the flour. " * 20 + "Then bake it for twenty minutes."
    variants = [
        base[3],  # exact duplicate
        base[5],  # exact duplicate
        record(base[7]["conversations"][0]["content"].upper(), base[7]["conversations"][1]["content"].lower()),
        record("  " + base[9]["conversations"][0]["content"].replace(" ", "\n\t "), base[9]["conversations"][1]["content"]),
        # punctuation is meaning: not a duplicate
        record(base[11]["conversations"][0]["content"].replace(":", "").replace("?", "!!"), "the ANSWER is 22"),
        record("Bake a cake", long_answer),
        record("BAKE  a cake", long_answer.upper().replace(". ", ".\n\n")),  # case and whitespace only
        record("Bake a cake", long_answer + " Serve warm."),  # same opening, different ending
        # Unicode: NFKC folds full-width letters, case folds
        record("ＣＡＦÉ ｍｅｎｕ？", "Crème brûlée"),
        record("café menu?", "CRÈME BRÛLÉE"),
    ]
    write_input(ws, base + variants)
    m = run(ws)
    assert m["records_in"] == 50
    assert m["duplicates_exact"] == 2
    assert m["duplicates_normalized"] == 4  # the variants of 7 and 9, the long reflow, the café pair
    assert m["records_out"] == 44
    kept = [rec for recs in outputs(ws).values() for rec in recs]
    assert len(kept) == 44
    answers = Counter(rec["conversations"][-1]["content"] for rec in kept)
    assert answers[long_answer] == 1 and answers[long_answer + " Serve warm."] == 1
    assert answers["Crème brûlée"] == 1  # the first occurrence is the one kept


def test_normalized_duplicates_among_records_that_share_prompts(tmp_path):
    """Normalized duplicates where many records share a prompt: many answers to one prompt,
    some of them case, whitespace or full-width variants of another, anagram answers, the
    same answer under another prompt, answer-only and unanswered records, a prompt shared by
    the first block and the last, in many blocks, with and without workers. The counts are
    checked against ones made record by record: the scan normalizes answers only where a
    prompt is shared, within a block or read back from another."""
    import random

    from factory.textsim import normalize

    rng = random.Random(7)
    records = []
    for i in range(900):
        prompt = f"Question {i % 40}: explain the idea of item {i % 40} in plain words."
        answer = f"Answer {i % 70} with detail {'and more ' * (i % 5)}ending."
        if i % 9 == 0:
            answer = rng.choice([answer.upper(), answer.replace(" ", "\n  "), "  " + answer.lower() + "\t"])
        if i % 31 == 0:
            prompt = prompt.replace("Question", "Query")  # the same answer under another prompt
        records.append(record(prompt, answer, system="Be brief." if i % 2 else None))
    # answers of the same letters in another order (anagrams); full-width letters
    records += [record("Anagrams, please.", f"{w} now.") for w in ("listen", "silent", "Silent", "enlist", "tinsel") * 3]
    records += [record("Which café?", t) for t in ("ＣＡＦÉ  Ｎｏｒｄ", "café nord", "Café Nord.", "café\u00a0nord")]
    records += [{"conversations": [{"role": "assistant", "content": t}]} for t in ("Hello there.", "HELLO  there.", "Hi.")]
    records += [{"conversations": [{"role": "user", "content": t}]} for t in ("Open question one.", "open QUESTION one.")]
    # a prompt shared within the first block and by a record of the last one
    records = [record("Shared far apart.", t) for t in ("Far answer one.", "Far answer two.")] + records
    records.append(record("shared  FAR apart.", "far ANSWER one."))
    lines = list(dict.fromkeys(orjson.dumps(r) for r in records))
    by_text = {tuple((t["role"], normalize(t["content"])) for t in orjson.loads(line)["conversations"]) for line in lines}
    for i, workers in enumerate((1, 2)):
        ws = Workspace.at(tmp_path / str(i))
        write_input(ws, records)
        m = run(ws, workers=workers, chunk_bytes=2 << 10)
        assert m["duplicates_exact"] == len(records) - len(lines)
        assert m["duplicates_normalized"] == len(lines) - len(by_text) > 50
        assert m["accounting"]["balanced"]


def test_symbols_digits_and_signs_are_not_normalized_away(ws):
    distinct = [("Simplify: x = a + b", "x = a + b"), ("Simplify: x = a - b", "x = a - b"),
                ("What is -5 + 10?", "5"), ("What is 5 + 10?", "15"), ('Parse {"a": [1, 2]}', "ok"),
                ('Parse {"a": [1; 2]}', "error"), ("Sort 1,2", "1 2"), ("Sort 1.2", "1.2")]
    write_input(ws, unique_records(30) + [record(q, a) for q, a in distinct])
    m = run(ws)
    assert m["duplicates_normalized"] == 0 and m["duplicates_exact"] == 0
    assert m["records_out"] == 38
    assert m["accounting"]["balanced"]


def test_dedup_can_be_switched_off(ws):
    records = unique_records(30)
    write_input(ws, records + records[:5] + [record("QUESTION  number 1: what is 1 plus 1?", "the ANSWER is 2.")])
    m = run(ws, {"dedup": {"exact": False, "normalized": False}})
    assert m["duplicates_exact"] == m["duplicates_normalized"] == 0
    assert m["records_out"] == 36
    # copies still land in one split: they share a prompt
    assert m["leakage"]["total"] == 0
    m = run(ws, {"dedup": {"exact": False}})
    assert (m["duplicates_exact"], m["duplicates_normalized"]) == (0, 6)


def test_records_sharing_a_prompt_never_cross_splits(ws):
    records = unique_records(120)
    for i in range(40):  # 40 prompts with 3 to 5 different answers each
        records += [record(f"Shared prompt {i}", f"Answer {j} to prompt {i}", system="Be brief.") for j in range(3 + i % 3)]
    records += [record(f"shared  PROMPT {i}", f"Yet another answer {i}", system="be brief.") for i in range(10)]
    write_input(ws, records)
    m = run(ws)
    assert m["groups"] == 160
    assert m["largest_group"] == 6
    seen = defaultdict(set)
    for name, recs in outputs(ws).items():
        for rec in recs:
            text = " ".join(t["content"] for t in rec["conversations"][:-1]).lower().replace("!", "").replace(".", "")
            seen[text].add(name)
    assert all(len(where) == 1 for where in seen.values())
    assert {pair: m["leakage"][pair] for pair in ("train_val", "train_test", "val_test")} == {
        pair: {"user_turns": 0, "near_duplicates": 0} for pair in ("train_val", "train_test", "val_test")}
    assert m["leakage"]["total"] == 0
    assert abs(m["counts"]["test"] - 0.1 * m["records_out"]) <= 6


@pytest.mark.parametrize("prompt", ["Prompt {}", "Tell me about prompt number {} in detail"],
                         ids=["parsed", "keyed"])
def test_leakage_is_measured_when_prompt_grouping_is_off(ws, prompt):
    """Nothing keeps records that share a user turn together, and the check counts them in
    every pair of splits, as the files say. Prompts of three words or more are near-duplicate
    candidates: the check then keys the lines it reads and takes their turns from the scan
    (_KnownLines); shorter ones it parses."""
    records = [record(prompt.format(i % 20), f"Answer {i}") for i in range(200)]
    write_input(ws, records)
    m = run(ws, {"split": {"group_by_prompt": False}})
    assert m["groups"] == 200
    assert m["counts"] == {"train": 160, "val": 20, "test": 20}
    where = defaultdict(set)
    for name, recs in outputs(ws).items():
        for rec in recs:
            where[prompt_of(rec)].add(name)
    for a, b in split.PAIRS:
        expected = sum(1 for names in where.values() if {a, b} <= names)
        assert m["leakage"][f"{a}_{b}"] == {"user_turns": expected, "near_duplicates": 0}
    assert m["leakage"]["total"] > 0


def test_stratify_keeps_label_proportions(ws):
    labels = ["positive"] * 140 + ["negative"] * 50 + ["neutral"] * 10
    records = [record(f"Review {i}: it was {'great' if lab == 'positive' else 'meh'} {i}", lab, meta={"label": lab})
               for i, lab in enumerate(labels)]
    write_input(ws, records)
    for field in ("label", "assistant"):
        m = run(ws, {"split": {"stratify": field}})
        assert m["counts"] == {"train": 160, "val": 20, "test": 20}
        assert m["strata_distinct"] == 3
        per_split = {name: Counter(rec["conversations"][-1]["content"] for rec in recs) for name, recs in outputs(ws).items()}
        assert {name: dict(c) for name, c in per_split.items()} == m["strata"]
        for name, share in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
            for label, total in Counter(labels).items():
                assert abs(per_split[name][label] - share * total) <= 1, (field, name, label)


def test_many_small_strata_still_fill_every_split(ws):
    # every record its own stratum value: a per-stratum cut would put all of them in train
    write_input(ws, [record(f"q{i}", f"a{i}", meta={"id": i}) for i in range(50)])
    m = run(ws, {"split": {"stratify": "id"}})
    assert m["counts"] == {"train": 40, "val": 5, "test": 5}


def test_stratify_field_missing_everywhere(ws):
    write_input(ws, unique_records(20))
    with pytest.raises(InputError, match="stratify.*labl"):
        run(ws, {"split": {"stratify": "labl"}})


def test_a_source_field_kept_in_meta_through_the_cli_is_a_stratum(tmp_path):
    """Dolly's `category` was dropped by `format`, so `stratify: category` stopped with exit 2.
    An input's `meta: [category, info.source]` keeps those fields (a path too; a headerless
    CSV's by column number), and the split files, counted here, hold each category in the
    requested share."""
    categories = ["open_qa"] * 6 + ["closed_qa"] * 3 + ["brainstorming"]
    rows = [{"instruction": f"Question {i} about topic {i * 7919 % 1000}?", "context": "",
             "response": f"Answer {i}.", "category": categories[i % 10], "info": {"source": f"s{i % 2}"}}
            for i in range(1000)]
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "dolly.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (raw / "extra.csv").write_text("".join(f"Extra question {i}?,Extra answer {i}.,open_qa\n" for i in range(100)))
    (tmp_path / "factory.yaml").write_text(
        "data:\n  inputs:\n    - {path: data/raw/dolly.jsonl, meta: [category, info.source]}\n"
        "    - {path: data/raw/extra.csv, header: false, mapping: {user: 0, assistant: 1}, meta: [2]}\n"
        "  split: {stratify: category}\n")
    ws = run_cli(tmp_path)
    formatted = [json.loads(line) for line in ws.formatted_file.read_text().splitlines()]
    assert formatted[0]["meta"] == {"category": "open_qa", "info.source": "s0"}
    assert formatted[-1]["meta"] == {"2": "open_qa"}
    counts = {name: Counter(json.loads(line)["meta"].get("category") for line in ws.split_file(name).read_text().splitlines())
              for name in SPLITS}
    assert sum(c[None] for c in counts.values()) == 100  # the CSV's column is kept as `2`, not `category`
    for category, total in Counter(categories * 100).items():
        for name, ratio in zip(SPLITS, (0.8, 0.1, 0.1)):
            assert abs(counts[name][category] - ratio * total) <= 1, (category, name, counts)


def test_zero_ratio_split_is_written_empty(ws):
    write_input(ws, unique_records(10))
    m = run(ws, {"split": {"train": 0.7, "val": 0.3, "test": 0.0}})
    assert m["counts"] == {"train": 7, "val": 3, "test": 0}
    assert ws.split_file("test").read_bytes() == b""


def test_small_data_gives_every_split_a_record(ws):
    write_input(ws, unique_records(4))
    m = run(ws)
    assert sorted(m["counts"].values()) == [1, 1, 2]


def test_missing_input_says_run_format(ws):
    with pytest.raises(InputError, match="factory run format"):
        run(ws)


def test_too_few_records(ws):
    write_input(ws, unique_records(2) + unique_records(2))
    with pytest.raises(InputError, match=r"2 record\(s\) left after de-duplication.*2 exact"):
        run(ws)


def test_too_few_prompts(ws):
    write_input(ws, [record("The only prompt", f"answer {i}") for i in range(30)])
    with pytest.raises(InputError, match="group_by_prompt"):
        run(ws)
    m = run(ws, {"split": {"group_by_prompt": False}})
    assert m["counts"] == {"train": 24, "val": 3, "test": 3}


def test_a_broken_line_is_reported_with_its_number(ws):
    write_input(ws, [orjson.dumps(r) + b"\n" for r in unique_records(5)] + [b'{"conversations": oops\n'])
    with pytest.raises(InputError, match="line 6"):
        run(ws)


def test_the_turns_simdjson_reads_are_those_orjson_reads(tmp_path):
    """The scan and the check take each record's turns through simdjson, building strings only
    for what they ask; anything simdjson refuses goes through orjson. Both give the same."""
    lines = [orjson.dumps(r) for r in unique_records(20)] + [
        orjson.dumps(record("é\u2028 😀 \" \\n \x00", "x", system="s", meta={"turns": [{"role": "user"}]})),
        b'{"conversations": [{"content": "q", "role": "user"}, {"role": "assistant", "content": "a", "x": null}]}',
        b' {"conversations":[{"role":"tool","content":"{\\"a\\": 1}"}, {"role":"user","content":"\\ud83d\\ude00"}]} ',
    ]
    big = b'{"conversations": [{"role": "user", "content": "q"}], "n": 123456789012345678901234567890}'
    for role in (None, "user"):
        expected = [[t for t in orjson.loads(line)["conversations"] if role is None or t["role"] == role]
                    for line in lines + [big]]
        counts, roles, contents = split._turns(lines, role)  # simdjson alone
        assert list(counts) == [len(t) for t in expected[:-1]]
        assert roles == [t["role"] for turns in expected[:-1] for t in turns]
        assert contents == [t["content"] for turns in expected[:-1] for t in turns]
        with pytest.raises(RuntimeError):  # an integer beyond 64 bits: orjson reads it, simdjson does not
            split._turns([big], role)
        data = b"\n".join(lines + [big]) + b"\n"
        (tmp_path / "all.jsonl").write_bytes(data)
        block = split._Block(str(tmp_path / "all.jsonl"), data, 0, role)
        assert block.turns.tolist() == [len(t) for t in expected]
        assert block.contents == [t["content"] for turns in expected for t in turns]
        bad = data + b'{"conversations": [{"role": "user", "content": 5}]}\n'
        (tmp_path / "all.jsonl").write_bytes(bad)
        with pytest.raises(InputError, match="line 25"):
            split._Block(str(tmp_path / "all.jsonl"), bad, 0, role)
        # two records on one line, as one array of lines would take them: refused, naming the line
        two = data + lines[0] + b"," + lines[1] + b"\n" + lines[2] + b"\n"
        (tmp_path / "all.jsonl").write_bytes(two)
        with pytest.raises(ValueError):
            split._turns(lines + [lines[0] + b"," + lines[1]], role)
        with pytest.raises(InputError, match="line 25"):
            split._Block(str(tmp_path / "all.jsonl"), two, 0, role)


@pytest.mark.parametrize("workers", [1, 2])
def test_blank_lines_and_a_missing_final_newline(tmp_path, workers):
    lines = [orjson.dumps(r) for r in unique_records(40)]
    for i, chunk_bytes in enumerate((1 << 20, 300)):  # one block; many blocks, some with blank lines
        ws = Workspace.at(tmp_path / str(i))
        ws.formatted_file.parent.mkdir(parents=True)
        ws.formatted_file.write_bytes(b"\n\n" + b"\n".join(lines[:10]) + b"\n\n\n" + b"\n".join(lines[10:]))
        m = run(ws, chunk_bytes=chunk_bytes, workers=workers)
        assert m["records_in"] == 40 and m["counts"] == {"train": 32, "val": 4, "test": 4}
        written = [ws.split_file(name).read_bytes() for name in SPLITS]
        assert all(data.endswith(b"\n") and b"\n\n" not in data for data in written)
        assert sorted(b"".join(written).splitlines()) == sorted(lines)
        assert [m["files"][name]["xxh3_128"] for name in SPLITS] == [xxhash.xxh3_128(d).hexdigest() for d in written]


def test_other_json_layouts_get_the_same_keys(ws):
    """Lines not written by orjson in the canonical key order are parsed instead of read as
    bytes; their normalized keys must match the canonical lines' keys."""
    records = unique_records(30)
    reordered = [
        json.dumps({"meta": {"src": "x"}, "conversations": [{"content": t["content"], "role": t["role"]} for t in r["conversations"]]}).encode() + b"\n"
        for r in records[:10]
    ]
    write_input(ws, records + reordered)
    m = run(ws)
    assert m["duplicates_exact"] == 0
    assert m["duplicates_normalized"] == 10
    assert m["records_out"] == 30


def test_tools_and_meta_after_the_conversation(ws):
    records = unique_records(30)
    with_extras = [dict(r, tools='[{"name": "f"}]', meta={"label": "x"}) for r in records[:5]]
    write_input(ws, records + with_extras)
    m = run(ws)
    assert m["duplicates_normalized"] == 5


def test_parallel_scan_matches_serial_scan(tmp_path):
    records = unique_records(1500)
    records += [record(f"Shared {i % 50}", f"Long answer {i} " + "word " * (i % 90), meta={"label": i % 4}) for i in range(1500)]
    copies = records[::37]
    records += copies
    results = []
    for i, workers in enumerate((1, 2)):
        ws = Workspace.at(tmp_path / str(i))
        write_input(ws, records)
        m = run(ws, {"split": {"stratify": "label"}}, workers=workers, chunk_bytes=16 << 10)
        results.append({k: v for k, v in m.items() if k not in ("seconds", "seconds_by_step")})
    assert results[0] == results[1]
    assert results[0]["duplicates_exact"] == len(copies)


def test_progress_is_reported(ws):
    write_input(ws, unique_records(40))
    cfg = parse_config({})
    progress = Progress()
    PHASE.run(PhaseContext(cfg, ws, progress, logging.getLogger("test.split")))
    assert [unit for _, unit in progress.starts] == ["records scanned", "records written", "records checked"]
    assert progress.done == 120


def test_phase_declaration(ws):
    cfg = parse_config({})
    assert PHASE.name == "split" and PHASE.metrics == "split" and PHASE.config_sections == ("data",)
    assert PHASE.inputs(cfg, ws) == [ws.formatted_file]
    assert PHASE.outputs(cfg, ws) == [ws.split_file(n) for n in SPLITS] + [ws.duplicates_file]


def test_scan_workers_start_safely_beside_other_threads(tmp_path):
    """With another thread alive (the CLI's progress display) the workers are spawned, not
    forked; the result is the same."""
    import threading

    records = unique_records(400)
    results = []
    already = threading.active_count()  # earlier tests in this process may leave threads (tqdm's monitor)
    for i, with_thread in enumerate((False, True)):
        ws = Workspace.at(tmp_path / str(i))
        write_input(ws, records)
        stop = threading.Event()
        helper = threading.Thread(target=stop.wait)
        if with_thread:
            helper.start()
        try:
            assert threading.active_count() == already + with_thread
            m = run(ws, workers=2, chunk_bytes=8 << 10)
        finally:
            stop.set()
        results.append([m["files"][name]["xxh3_128"] for name in SPLITS])
    assert results[0] == results[1]


def test_workers_hand_their_results_over_through_files_that_are_gone_after_the_run(tmp_path):
    """The scan's workers write their results to files for the split's process to read: the
    same metrics and files as a scan in one process, and the folder is gone after the run; a
    killed run's leftover folder does not stop the next."""
    base, near = paraphrases(30)
    records = unique_records(300) + [record(t, f"Answer {i}.") for i, t in enumerate(base + near)]
    results = []
    for i, workers in enumerate((1, 2)):
        ws = Workspace.at(tmp_path / str(i))
        write_input(ws, records)
        leftover = ws.formatted_dir / ".scan.partial"
        leftover.mkdir()
        (leftover / "0.bin").write_bytes(b"a killed run's")
        m = run(ws, workers=workers, chunk_bytes=8 << 10)
        assert not leftover.exists() and sorted(p.name for p in ws.formatted_dir.iterdir()) == [
            "all.jsonl", "duplicates.jsonl"]
        results.append({k: v for k, v in m.items() if k not in ("seconds", "seconds_by_step")})
    assert results[0] == results[1] and results[0]["near_duplicates"]["pairs"] >= 30


def test_empty_input(ws):
    write_input(ws, [])
    with pytest.raises(InputError, match="0 record"):
        run(ws)


def test_records_without_the_stratify_field_form_their_own_stratum(ws):
    records = [record(f"q{i}", f"a{i}", meta={"label": "yes" if i % 2 else "no"}) for i in range(80)]
    records += [record(f"q{i}", f"a{i}") for i in range(80, 100)]
    write_input(ws, records)
    m = run(ws, {"split": {"stratify": "label"}})
    assert m["strata_distinct"] == 3
    assert {name: m["strata"][name][split.MISSING] for name in SPLITS} == {"train": 16, "val": 2, "test": 2}
    assert m["strata"]["train"]["yes"] == m["strata"]["train"]["no"] == 32


# --- shared keys, near-duplicates, the independent leakage check, decontamination ---------


def norm(text):
    """The documented normalization, written out here on its own: NFKC, casefold, whitespace."""
    import unicodedata

    return " ".join(unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold()).split())


def recount_shared_user_turns(ws, min_words=0):
    """Re-read the split files with plain Python: {pair: shared normalized user turns}."""
    turns = {}
    for name in SPLITS:
        turns[name] = {norm(t["content"]) for rec in outputs(ws)[name] for t in rec["conversations"]
                       if t["role"] == "user" and len(norm(t["content"]).split()) >= min_words}
    return {f"{a}_{b}": len(turns[a] & turns[b]) for a, b in split.PAIRS}


def recount_lines(path):
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def multi(*pairs):
    turns = []
    for user, answer in pairs:
        turns += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"conversations": turns}


def test_a_user_turn_shared_by_single_and_multi_turn_conversations_stays_in_one_split(ws):
    """The ShareGPT case: questions that open single-turn conversations also appear as later
    user turns of multi-turn conversations (with other answers and other first turns)."""
    questions = [f"How do I reverse list number {i} in Python?" for i in range(60)]
    records = [record(q, f"Use reversed() on list {i}.") for i, q in enumerate(questions)]
    records += [multi((f"Hello, I have a coding problem {i}", f"Sure, go ahead {i}."),
                      (questions[(7 * i) % 60].upper(), f"Call list.reverse() {i}.")) for i in range(60)]
    records += unique_records(120)
    write_input(ws, records)
    m = run(ws)
    assert recount_shared_user_turns(ws) == {"train_val": 0, "train_test": 0, "val_test": 0}
    assert m["leakage"]["total"] == 0 and m["accounting"]["balanced"]
    # the same data split by whole prompt only leaks: the check sees it
    m = run(ws, {"split": {"group_by_prompt": False}})
    shared = recount_shared_user_turns(ws)
    assert sum(shared.values()) > 0
    assert {pair: m["leakage"][pair]["user_turns"] for pair in shared} == shared
    assert m["leakage"]["user_turns"] == sum(shared.values())
    example = next(e for e in m["leakage"]["examples"] if e["kind"] == "user_turn")
    a, b = example["pair"]
    assert a["split"] != b["split"] and norm(a["text"]) == norm(b["text"])
    line = ws.split_file(a["split"]).read_bytes().splitlines()[a["line"] - 1]
    assert a["text"] in [t["content"] for t in orjson.loads(line)["conversations"]]


@pytest.mark.parametrize("data", [{"dedup": {"near": "off"}}, {"split": {"group_by_prompt": False}}],
                         ids=["near-off", "not-grouped"])
def test_the_check_made_while_the_files_are_written_equals_one_made_after(ws, data):
    """The split's check reads each part of a split file back as it is written (in the
    workers, small parts here): it finds what a check of the finished files finds. With
    dedup.near off nothing links near-duplicate questions, so some end up in two splits; the
    check then signs every text itself. Searched but not grouped, the check takes the
    signatures of the scan (_Signed), and measure_leakage, which signs every text itself,
    finds the same pairs."""
    long_q = "Describe step by step how a bill becomes a law in a parliament with two chambers and a head of state {}"
    records = [record(long_q.format(f"example {i}"), f"Answer {i}.") for i in range(120)]  # Jaccard 0.9 to each other
    write_input(ws, records + unique_records(600))
    m = run(ws, data, workers=2, chunk_bytes=4 << 10)
    assert m["leakage"]["near_duplicates"] > 0 and m["leakage"]["user_turns"] == 0
    # every pair across splits, counted by brute force: LSH finds a pair at 0.9 with probability 0.99998
    # (12 bands of 5 rows; 0.997 with 9 of 7)
    across = near_pairs_across_splits(ws.splits_dir)
    assert 0.999 * across <= m["leakage"]["near_duplicates"] <= across and across > 1000
    cfg = parse_config({"data": data})
    settings = split.Settings(seed=cfg.data.split.seed, stratify=None, min_turn_words=cfg.data.split.min_turn_words,
                              ngram=3, near=False, threshold=0.8)
    after = split.measure_leakage(ws, settings, workers=2, chunk_bytes=64 << 10, log=logging.getLogger("test.split"))
    assert after == m["leakage"]
    assert m["accounting"]["balanced"] and m["leakage"]["records"] == m["counts"]
    example = next(e for e in m["leakage"]["examples"] if e["kind"] == "near_duplicate")
    for side in example["pair"]:  # the lines named are those of the finished files
        line = ws.split_file(side["split"]).read_bytes().splitlines()[side["line"] - 1]
        assert side["text"] == orjson.loads(line)["conversations"][0]["content"]


def templated_records(n=3000, words=300, seed=3):
    """A long template with two words drawn from `words` changed: texts that share the first
    word are near-duplicates (word 3-gram Jaccard 0.875), the others are not (0.76), and all
    share most LSH buckets."""
    import random

    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(words)]
    template = "Classify the sentiment of this short movie review as positive or negative and say why:"
    return [record(f"{template} {' '.join(rng.sample(vocab, 2))}", f"Answer {i}.") for i in range(n)]


def test_near_duplicates_in_an_lsh_bucket_too_large_for_all_its_pairs_are_found(ws, monkeypatch):
    """In a bucket above MAX_ALL_PAIRS_BUCKET (lowered to 64 so that 3,000 records do what
    100,000 do) each member was measured against the bucket's first and its neighbour only:
    near-duplicates that met only there stayed apart, in two splits, unseen by the check too.
    Texts of such a bucket that share a rare n-gram are now candidates: none is left, by
    brute force."""
    from factory import textsim

    monkeypatch.setattr(textsim, "MAX_ALL_PAIRS_BUCKET", 64)
    write_input(ws, templated_records())
    monkeypatch.setattr(textsim, "RARE_NGRAM_ROWS", 0)  # as before
    before = run(ws)
    missed = near_pairs_across_splits(ws.splits_dir)
    assert missed > 0 and before["leakage"]["near_duplicates"] < missed
    monkeypatch.setattr(textsim, "RARE_NGRAM_ROWS", 32)
    after = run(ws)
    assert near_pairs_across_splits(ws.splits_dir) == 0 and after["leakage"]["total"] == 0
    assert after["groups"] == 300  # the texts of each first word, linked
    assert after["accounting"]["balanced"] and sum(after["counts"].values()) == 3000


def test_near_duplicates_the_check_would_find_across_splits_are_joined_after_assignment(ws, monkeypatch):
    """Where a search misses pairs (buckets too large for all their pairs, searched without
    the rare n-grams here), the check, reading other rows in another order, can meet some the
    grouping did not, and splits-ready failed. After assignment the split searches as the
    check will and moves the groups of each pair found into one split."""
    from factory import textsim

    monkeypatch.setattr(textsim, "MAX_ALL_PAIRS_BUCKET", 64)
    monkeypatch.setattr(textsim, "RARE_NGRAM_ROWS", 0)
    write_input(ws, templated_records())
    monkeypatch.setattr(split, "NEAR_REPAIRS", 0)
    before = run(ws)
    assert before["leakage"]["near_duplicates"] > 0 and before["near_duplicates"]["repaired_after_assignment"] == 0
    monkeypatch.setattr(split, "NEAR_REPAIRS", 10)
    after = run(ws)
    assert after["near_duplicates"]["repaired_after_assignment"] >= before["leakage"]["near_duplicates"]
    assert after["leakage"]["total"] == 0 and after["accounting"]["balanced"]
    assert after["groups"] < before["groups"] and sum(after["counts"].values()) == 3000


def test_a_part_checked_after_its_file_was_renamed_is_read_from_the_finished_file(ws):
    """A part handed to the check names the file being written; when a worker gets to it
    after the file was completed (renamed in place), it reads the same bytes there."""
    write_input(ws, unique_records(50))
    run(ws)
    path = ws.split_file("train")
    cfg = parse_config({})
    split._init_worker(split.Settings(seed=cfg.data.split.seed, stratify=None, min_turn_words=0, ngram=3, near=True,
                                      threshold=0.8))
    size = path.stat().st_size
    gone = path.with_name(f".{path.name}.partial")
    assert not gone.exists()
    late = split._check_block((str(gone), 0, size, 0, str(path), True))
    assert late == split._check_block((str(path), 0, size, 0, None, True)) and late["records"] == 40
    with pytest.raises(FileNotFoundError):
        split._check_block((str(gone), 0, size, 0, None, True))


def test_the_leakage_check_fails_on_split_files_that_leak(ws):
    """measure_leakage reads only the split files: written by hand here, they leak an exact
    user turn (case and spacing differ) and a near-duplicate one."""
    long_q = "Explain in detail how the water cycle moves water between the oceans the air and the land over a year"
    near_q = long_q.replace("over a year", "over a decade")  # 17 of 19 word 3-grams shared: Jaccard 0.89
    ws.splits_dir.mkdir(parents=True)
    files = {
        "train": [record("What is the capital of France?", "Paris"), record(long_q, "Evaporation...")]
        + unique_records(20, "train"),
        "val": [record("what is  the CAPITAL of France?", "Paris.")] + unique_records(5, "val"),
        "test": [record(near_q, "It evaporates...")] + unique_records(5, "test"),
    }
    for name, records in files.items():
        ws.split_file(name).write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    cfg = parse_config({})
    settings = split.Settings(seed=cfg.data.split.seed, stratify=None, min_turn_words=0, ngram=3, near=True,
                              threshold=0.8)
    leakage = split.measure_leakage(ws, settings)
    assert leakage["train_val"] == {"user_turns": 1, "near_duplicates": 0}
    assert leakage["train_test"] == {"user_turns": 0, "near_duplicates": 1}
    assert leakage["total"] == 2 and leakage["records"] == {"train": 22, "val": 6, "test": 6}
    near = next(e for e in leakage["examples"] if e["kind"] == "near_duplicate")
    assert {near["pair"][0]["text"], near["pair"][1]["text"]} == {long_q, near_q} and near["jaccard"] >= 0.8
    # the gate reads the same number
    from factory.gates import check_gate, load_gates
    from factory.io import write_json

    write_json(ws.metrics_file("split"), {"leakage": leakage, "decontamination": {"remaining_in_train": 0},
                                          "accounting": {"balanced": True}, "counts": {"train": 22, "test": 6}})
    result = check_gate(load_gates(ws, cfg)["splits-ready"], ws, {"split": "split"})
    assert not result["passed"]
    assert next(c for c in result["criteria"] if c["metric"] == "split.leakage.total")["observed"] == 2


def paraphrases(n):
    """n questions, each with a near-duplicate (one word changed in a long question)."""
    base = [f"Please describe in a few sentences what happened in the year {1800 + i} in the history of the town "
            f"called Place{i} near the river" for i in range(n)]
    return base, [q.replace("near the river", "near the rivers") for q in base]


def test_near_duplicates_are_grouped_by_default(ws):
    base, near = paraphrases(40)
    write_input(ws, [record(q, f"Answer A{i}") for i, q in enumerate(base)] +
                [record(q, f"Answer B{i}") for i, q in enumerate(near)] + unique_records(100))
    m = run(ws)
    assert m["near_duplicates"]["pairs"] >= 38 and m["near_duplicates"]["dropped"] == 0
    assert m["records_out"] == 180 and m["leakage"]["near_duplicates"] == 0
    where = {}
    for name, recs in outputs(ws).items():
        for rec in recs:
            where.setdefault(rec["conversations"][0]["content"].replace("the rivers", "the river"), set()).add(name)
    assert all(len(s) == 1 for s in where.values())


def test_near_duplicates_dropped_are_written_with_the_record_they_duplicate(ws):
    base, near = paraphrases(30)
    records = [record(q, f"Answer A{i}") for i, q in enumerate(base)] + unique_records(80)
    records += [record(q, f"Answer B{i}") for i, q in enumerate(near)]
    records += [records[0], record(records[1]["conversations"][0]["content"].upper(), records[1]["conversations"][1]["content"])]
    write_input(ws, records)
    m = run(ws, {"dedup": {"near": "drop"}})
    assert m["near_duplicates"]["dropped"] >= 28
    entries = [orjson.loads(line) for line in ws.duplicates_file.read_bytes().splitlines()]
    assert m["duplicates_file"]["records"] == len(entries) == m["near_duplicates"]["dropped"] + 2
    source = ws.formatted_file.read_bytes().splitlines()
    for e in entries:
        assert orjson.loads(source[e["line"] - 1]) == e["record"]
        assert orjson.loads(source[e["duplicate_of_line"] - 1]) == e["duplicate_of"]
        assert e["duplicate_of_line"] < e["line"]
        if e["kind"] == "near":
            assert e["jaccard"] >= 0.8
            assert e["record"]["conversations"][0]["content"].replace("the rivers", "the river") == \
                e["duplicate_of"]["conversations"][0]["content"]
    assert Counter(e["kind"] for e in entries)["exact"] == 1 and Counter(e["kind"] for e in entries)["normalized"] == 1
    # every record accounted for, counted from the files alone
    assert recount_lines(ws.formatted_file) == sum(recount_lines(ws.split_file(n)) for n in SPLITS) + len(entries)


def test_near_duplicate_ngrams_spilled_from_workers_match_one_process(tmp_path):
    """The near-duplicate candidates' n-gram hashes, spilled block by block as the worker
    processes send them (blocks of 2 KB) and read back: the same pairs, drops and files as in
    one process."""
    base, near = paraphrases(30)
    records = [record(q, f"Answer A{i}") for i, q in enumerate(base)] + unique_records(80)
    records += [record(q, f"Answer B{i}") for i, q in enumerate(near)]
    results = []
    for i, workers in enumerate((1, 2)):
        ws = Workspace.at(tmp_path / str(i))
        write_input(ws, records)
        m = run(ws, {"dedup": {"near": "drop"}}, workers=workers, chunk_bytes=2 << 10)
        results.append(({k: v for k, v in m.items() if k not in ("seconds", "seconds_by_step")},
                        ws.duplicates_file.read_bytes()))
        assert sorted(p.name for p in ws.splits_dir.iterdir()) == ["test.jsonl", "train.jsonl", "val.jsonl"]
        assert sorted(p.name for p in ws.formatted_dir.iterdir()) == ["all.jsonl", "duplicates.jsonl"]
    assert results[0] == results[1]
    assert results[0][0]["near_duplicates"]["dropped"] >= 28


def test_spilled_ngrams_read_back_in_any_order_and_window_as_the_file_grows(tmp_path, monkeypatch):
    """Rows of n-gram hashes added in blocks (some rows with none) read back as asked: any
    order, any window, each row's hashes in order and the index of its row beside each; rows
    added after a read are read as well as the earlier ones."""
    rng = np.random.default_rng(5)
    counts = rng.integers(0, 9, 3000)
    hashes = rng.integers(0, 2**63, int(counts.sum()), dtype=np.uint64)
    ends = np.cumsum(counts)
    with split.SpilledNgrams(tmp_path) as spilled:
        for lo, hi in ((0, 7), (7, 8), (8, 1500), (1500, 3000)):
            a, b = (ends[lo - 1] if lo else 0), ends[hi - 1]
            spilled.add(hashes[a:b].tobytes(), counts[lo:hi].astype(np.int64).tobytes())
            for window in (8, 8192, 1 << 24):
                monkeypatch.setattr(split.SpilledNgrams, "WINDOW", window)
                rows = rng.permutation(hi)[:1200]
                got, owner = spilled.read(rows)
                expected = [hashes[ends[r] - counts[r]:ends[r]] for r in rows]
                assert got.tolist() == np.concatenate(expected).tolist()
                assert owner.tolist() == np.repeat(np.arange(rows.size), counts[rows]).tolist()


def test_short_generic_turns_can_be_kept_from_linking(ws):
    records = [multi((f"Write a poem about topic {i}", f"Poem {i}"), ("continue", f"More poem {i}")) for i in range(100)]
    write_input(ws, records)
    with pytest.raises(InputError, match="min_turn_words"):
        run(ws)  # "continue" ties all 100 conversations into one group
    m = run(ws, {"split": {"min_turn_words": 2}})
    assert m["groups"] == 100 and m["leakage"]["total"] == 0
    assert recount_shared_user_turns(ws, min_words=2) == {"train_val": 0, "train_test": 0, "val_test": 0}


def test_an_empty_user_turn_is_shared_like_any_other(ws):
    """An empty (or blank) user turn inside a conversation passes `format`: with min_turn_words 0
    the conversations that hold one are one group, as for any user turn they share."""
    records = [multi((f"Tell me a story about dragon number {i} please", f"Once upon a time {i}."),
                     (" " if i % 2 else "", f"And then dragon {i} flew away."))
               for i in range(40)]
    write_input(ws, records + unique_records(200))
    m = run(ws)
    assert m["largest_group"] == 40 and m["leakage"]["total"] == 0
    assert recount_shared_user_turns(ws) == {"train_val": 0, "train_test": 0, "val_test": 0}
    where = {name for name, recs in outputs(ws).items() for rec in recs if len(rec["conversations"]) == 4}
    assert len(where) == 1
    m = run(ws, {"split": {"min_turn_words": 1}})  # an empty turn links nothing, and is no leakage
    assert m["largest_group"] == 1 and m["leakage"]["total"] == 0
    assert recount_shared_user_turns(ws, min_words=1) == {"train_val": 0, "train_test": 0, "val_test": 0}


@pytest.mark.parametrize("seed", [3407, 1, 2])
def test_a_group_larger_than_val_and_test_goes_to_train_and_the_rest_fills_them_evenly(ws, seed):
    """850 of 1,000 conversations share a follow-up turn: their group cannot fit val's or
    test's 100 records. Laid out among the others by key it left val or test a few records
    or none; it now goes to train, and the other 150 records are val's and test's, 75 each."""
    records = [multi((f"Summarize article number {i} for me", f"Article {i} says {i}."),
                     ("Please explain that again in more detail.", f"In detail, article {i}...")) for i in range(850)]
    write_input(ws, records + unique_records(150))
    m = run(ws, {"split": {"seed": seed}})
    files = outputs(ws)
    assert [len(files[name]) for name in SPLITS] == [850, 75, 75]
    assert all(len(rec["conversations"]) == 4 for rec in files["train"])
    assert recount_shared_user_turns(ws) == {"train_val": 0, "train_test": 0, "val_test": 0}
    assert m["largest_group"] == 850 and m["leakage"]["total"] == 0


@pytest.mark.parametrize("seed", [3407, 1, 2])
def test_groups_that_fit_in_val_or_test_are_spread_over_the_splits(ws, seed):
    """Ten topics of 60 conversations each (a shared follow-up question) and 400 others: each
    topic group is above half of val's 100 records, so it is placed first; one that fits goes
    to the split lacking the largest part of its share, so val and test each hold a topic,
    and the totals are still exactly 800/100/100."""
    records = [multi((f"Topic {t} question number {i} asked here", f"A {t} {i}."),
                     (f"Tell me more about topic number {t} please", f"D {i}.")) for t in range(10) for i in range(60)]
    write_input(ws, records + unique_records(400))
    m = run(ws, {"split": {"seed": seed}})
    files = outputs(ws)
    topics = {name: {rec["conversations"][2]["content"] for rec in recs if len(rec["conversations"]) == 4}
              for name, recs in files.items()}
    assert [len(files[name]) for name in SPLITS] == [800, 100, 100]
    assert [len(topics[name]) for name in SPLITS] == [8, 1, 1]
    assert recount_shared_user_turns(ws) == {"train_val": 0, "train_test": 0, "val_test": 0}
    assert m["largest_group"] == 60 and m["leakage"]["total"] == 0


@pytest.mark.parametrize("seed", [3407, 1, 2])
def test_groups_of_two_each_its_own_stratum_fill_val_and_test_alike(ws, seed):
    """200 topics, each two conversations sharing a follow-up question: a group of two alone in
    its stratum, whose midpoint falls on a cut between val and test. Always sent to the later
    side, val got 2 records and test 80; ties now take the two sides in turn: 40 each, give or
    take a group."""
    records = []
    for i in range(200):
        for j in range(2):
            pair = multi((f"Opening question {i}-{j} about the weather today", f"Sunny {i}{j}."),
                         (f"Shared follow-up question number {i} here", f"Yes {i}{j}."))
            records.append({**pair, "meta": {"topic": f"t{i}"}})
    write_input(ws, records)
    m = run(ws, {"split": {"stratify": "topic", "seed": seed}})
    files = outputs(ws)
    assert len(files["train"]) == 320 and m["groups"] == 200
    assert abs(len(files["val"]) - 40) <= 2 and abs(len(files["test"]) - 40) <= 2
    assert recount_shared_user_turns(ws) == {"train_val": 0, "train_test": 0, "val_test": 0}

def test_decontamination_removes_train_hits_and_reports_the_rest(ws):
    bench = [{"instruction": f"Natalia sold clips to {i} of her friends in April and then she sold half as many "
                             f"clips in May. How many clips did Natalia sell altogether in April and May?",
              "input": "", "output": str(i)} for i in range(10, 40)]
    bench_file = ws.root / "bench" / "gsm8k_test.json"
    bench_file.parent.mkdir(parents=True)
    bench_file.write_bytes(orjson.dumps(bench))
    records = unique_records(200)
    records += [record(b["instruction"].upper(), "copied") for b in bench[:10]]  # exact (normalized) copies
    records += [record("Solve this: " + b["instruction"].split(" and then")[0] + " and then she sold more.", "x")
                for b in bench[10:20]]  # a shared run of 13+ words
    write_input(ws, records)
    m = run(ws, {"decontaminate": [str(bench_file)]})
    d = m["decontamination"]
    assert d["by_match"] == {"exact": 10, "ngram": 10}
    assert sum(d["found"].values()) == 20 and d["removed"] == d["found"]["train"] > 0
    assert d["remaining_in_train"] == 0
    hits = [orjson.loads(line) for line in ws.contaminated_file.read_bytes().splitlines()]
    assert len(hits) == 20 and sum(h["removed"] for h in hits) == d["removed"]
    assert all(h["benchmark"]["file"] == "bench/gsm8k_test.json" for h in hits)
    train = {rec["conversations"][0]["content"] for rec in outputs(ws)["train"]}
    assert not train & {h["record"]["conversations"][0]["content"] for h in hits}
    a = m["accounting"]
    assert a["balanced"] and a["decontaminated"] == d["removed"]
    assert recount_lines(ws.formatted_file) == sum(recount_lines(ws.split_file(n)) for n in SPLITS) + d["removed"]
    m = run(ws, {"decontaminate": {"benchmarks": [str(bench_file)], "action": "report"}})
    assert m["decontamination"]["removed"] == 0 and m["decontamination"]["remaining_in_train"] > 0


def test_near_duplicates_and_contamination_in_scripts_without_spaces(ws):
    """Chinese and Thai have no spaces between words: each letter counts as a word there, so a
    prompt that differs from another in one letter is a near-duplicate, and a benchmark
    question copied into a longer prompt is contamination. With a whole sentence as one
    word, neither was found (0 pairs, 0 hits)."""
    import random

    rng = random.Random(7)
    han = [chr(c) for c in range(0x4E00, 0x9FA6)]
    thai = [chr(c) for c in range(0x0E01, 0x0E2F)]
    texts = ["".join(rng.choice(han if i % 2 else thai) for _ in range(60)) for i in range(140)]
    near = [t[:30] + ("中" if t[30] != "中" else "国") + t[31:] for t in texts[:20]]  # one letter changed
    bench = [{"instruction": t, "input": "", "output": "x"} for t in texts[120:]]
    bench_file = ws.root / "bench.json"
    bench_file.write_bytes(orjson.dumps(bench))
    copied = [f"请回答：{b['instruction'][:20]}。" for b in bench[:5]]  # a 20-letter run of each question
    write_input(ws, [record(t, f"A{i}") for i, t in enumerate(texts[:120])] +
                [record(t, f"B{i}") for i, t in enumerate(near)] + [record(t, "C") for t in copied])
    m = run(ws, {"decontaminate": [str(bench_file)]})
    assert m["near_duplicates"]["pairs"] == 20
    assert m["decontamination"]["by_match"] == {"exact": 0, "ngram": 5}
    where = {}
    for name, recs in outputs(ws).items():
        for rec in recs:
            where.setdefault(rec["conversations"][0]["content"][:30], set()).add(name)
    assert all(len(s) == 1 for s in where.values())  # each near pair in one split


def test_minhash_signatures_are_datasketchs_and_lsh_finds_what_datasketch_finds(monkeypatch):
    from datasketch import MinHash, MinHashLSH

    from factory import textsim

    base, near = paraphrases(30)
    texts = [textsim.normalize(t) for t in base + near + [q["conversations"][0]["content"] for q in unique_records(200)]]
    sig = textsim.signatures(texts, 3)
    hashes, owner = textsim.ngram_hashes(texts, 3)
    minhashes = []
    for i in range(len(texts)):
        m = MinHash(num_perm=textsim.NUM_PERM, seed=textsim.MINHASH_SEED, hashfunc=int, scheme="affine32")
        m.update_batch(textsim.shingle_hash32(hashes[owner == i]).tolist())
        assert (m.hashvalues == sig[i]).all()
        minhashes.append(m)
    bands, rows = textsim.lsh_params(0.8)
    keys = textsim.band_keys(sig, bands, rows)
    low, high = textsim.candidate_pairs(keys)
    lsh = MinHashLSH(threshold=0.8, num_perm=textsim.NUM_PERM, params=(bands, rows))
    for i, m in enumerate(minhashes):
        lsh.insert(i, m)
    theirs = {(min(i, j), max(i, j)) for i, m in enumerate(minhashes) for j in lsh.query(m) if i != j}
    assert set(zip(low.tolist(), high.tolist())) == theirs
    assert np.allclose(textsim.estimated_jaccard(sig, low, high), [minhashes[i].jaccard(minhashes[j]) for i, j in zip(low, high)])
    # the sketches' estimate never falls below datasketch's, so filtering on it loses no pair
    assert (textsim.estimated_jaccard(textsim.sketch(sig), low, high) >= textsim.estimated_jaccard(sig, low, high)).all()
    # the pairs kept are measured exactly on the word 3-gram sets
    def ngrams_of(rows):
        return textsim.ngram_hashes([texts[r] for r in rows], 3)

    a, b, similarity = textsim.near_duplicate_pairs(keys, textsim.sketch(sig), ngrams_of, 0.8)
    grams = [{tuple(t.split()[k:k + 3]) for k in range(len(t.split()) - 2)} for t in texts]
    exact = {(i, j) for i in range(len(texts)) for j in range(i + 1, len(texts))
             if len(grams[i] & grams[j]) / len(grams[i] | grams[j]) >= 0.8}
    assert set(zip(a.tolist(), b.tolist())) == exact and len(exact) >= 30
    assert all(abs(x - len(grams[i] & grams[j]) / len(grams[i] | grams[j])) < 1e-9 for i, j, x in zip(a, b, similarity))
    monkeypatch.setattr(textsim, "NGRAMS_RUN", 7)  # the candidates' n-grams asked for a few at a time: the same pairs
    again = textsim.near_duplicate_pairs(keys, textsim.sketch(sig), ngrams_of, 0.8)
    assert all((x == y).all() for x, y in zip(again, (a, b, similarity)))


def test_lsh_parameters_are_the_ones_datasketch_picks():
    """textsim derives MinHashLSH's (bands, rows) without importing datasketch: the same for
    every threshold a user can set (two decimals), and at another signature length."""
    from datasketch import MinHashLSH

    from factory import textsim

    for num_perm, thresholds in ((textsim.NUM_PERM, np.arange(1, 100) / 100), (128, (0.3, 0.5, 0.8, 0.9, 0.95))):
        for threshold in map(float, thresholds):
            theirs = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=textsim.LSH_WEIGHTS)
            assert textsim.lsh_params(threshold, num_perm) == (theirs.b, theirs.r), threshold


@pytest.mark.parametrize("rows", [0, 1, 2, 50, 200_000])
def test_the_rows_searched_in_a_band_hold_every_row_that_shares_its_key(rows):
    from factory import textsim

    rng = np.random.default_rng(rows)
    keys = textsim.fmix64(rng.integers(0, 1 << 63, rows, dtype=np.int64).astype(np.uint64))
    keys[rng.random(rows) < 0.1] = keys[0] if rows else 0  # one key shared by a tenth of the rows
    pairs = rng.integers(0, rows, (2, rows // 20)) if rows else np.zeros((2, 0), np.int64)
    keys[pairs[0]] = keys[pairs[1]]  # and pairs
    _, inverse, count = np.unique(keys, return_inverse=True, return_counts=True)
    shared = np.flatnonzero(count[inverse] > 1)
    searched = textsim.maybe_shared(keys)
    assert (np.diff(searched) > 0).all() and np.isin(shared, searched).all()
    assert searched.size - shared.size <= 0.25 * (rows - shared.size)  # not all rows: the point of it
    assert textsim.first_of_each(keys).tolist() == np.sort(np.unique(keys, return_index=True)[1]).tolist()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    assert textsim.first_occurrences(keys).tolist() == first.tolist()
    assert all((x == y).all() for x, y in zip(textsim.first_occurrences(keys, inverse=True), (first, inverse)))


def variants(n, at=None):
    """A long question and n variants of it, each with four words of its own at the end: every
    variant is a near-duplicate of the question (Jaccard of word 3-grams 18/22), no two variants
    are (18/26). The question is the `at`-th text (the middle by default)."""
    question = " ".join(f"word{k}" for k in range(20))
    texts = [f"{question} own{i}a own{i}b own{i}c own{i}d" for i in range(n)]
    texts.insert(n // 2 if at is None else at, question)
    return texts


def test_a_question_with_hundreds_of_variants_is_linked_to_every_one(monkeypatch):
    """LSH buckets of a question and its many variants hold far more than 32 texts: the
    candidates are every pair of every bucket, as datasketch's MinHashLSH query gives them (a
    bucket's first member and neighbours only, as before, missed most question-variant
    pairs); measured for linking (dedup.near: group), fewer pairs are measured and the groups
    are those of all pairs."""
    from datasketch import MinHash, MinHashLSH
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from factory import textsim

    other = " ".join(f"term{k}" for k in range(20))
    texts = variants(300) + [f"{other} alone{i}" for i in range(60)]  # and 60 near-duplicates of each other (18/20)
    sig = textsim.signatures(texts, 3)
    bands, rows = textsim.lsh_params(0.8)
    keys = textsim.band_keys(sig, bands, rows)
    sizes = [np.unique(keys[:, k], return_counts=True)[1].max() for k in range(bands)]
    assert max(sizes) > textsim.SMALL_BUCKET  # the case this is about
    lsh = MinHashLSH(threshold=0.8, num_perm=textsim.NUM_PERM, params=(bands, rows))
    minhashes = []
    for i, row in enumerate(sig):
        m = MinHash(num_perm=textsim.NUM_PERM, seed=textsim.MINHASH_SEED, hashvalues=row, scheme="affine32")
        lsh.insert(i, m)
        minhashes.append(m)
    theirs = {(min(i, j), max(i, j)) for i, m in enumerate(minhashes) for j in lsh.query(m) if i != j}
    low, high = textsim.candidate_pairs(keys)
    assert set(zip(low.tolist(), high.tolist())) == theirs

    def ngrams_of(found):
        return textsim.ngram_hashes([texts[r] for r in found], 3)

    a, b, _ = textsim.near_duplicate_pairs(keys, textsim.sketch(sig), ngrams_of, 0.8)
    grams = [{tuple(t.split()[k:k + 3]) for k in range(len(t.split()) - 2)} for t in texts]
    assert all(len(grams[i] & grams[j]) / len(grams[i] | grams[j]) >= 0.8 for i, j in zip(a, b))
    question = texts.index(" ".join(f"word{k}" for k in range(20)))
    linked_to_question = {int(j) for i, j in zip(a, b) if i == question} | {int(i) for i, j in zip(a, b) if j == question}
    assert len(linked_to_question) >= 250  # LSH finds most of the 300 (0.92 each), the buckets' heads did not
    assert sum(i >= 301 for i in a) >= 1000  # most of the 1,770 pairs of the 60

    def groups(x, y):
        graph = coo_matrix((np.ones(x.size), (x, y)), shape=(len(texts), len(texts)))
        return connected_components(graph, directed=False)[1]

    monkeypatch.setattr(textsim, "LINKING_RUN", 64)  # measured in many runs: pruning between runs
    la, lb, lj = textsim.near_duplicate_pairs(keys, textsim.sketch(sig), ngrams_of, 0.8, linking=True)
    assert sum(i >= 301 for i in la) < 200 and set(zip(la.tolist(), lb.tolist())) <= set(zip(a.tolist(), b.tolist()))
    same = groups(a, b)
    assert (groups(la, lb)[:, None] == groups(la, lb)[None, :]).tolist() == (same[:, None] == same[None, :]).tolist()
    assert (np.diff(la * len(texts) + lb) > 0).all() and (lj >= 0.8).all()


def test_the_lowest_jaccard_two_set_sizes_reach_is_that_of_the_smallest_intersection():
    from factory import textsim

    size_a, size_b = np.meshgrid(np.arange(1, 40), np.arange(1, 40))
    size_a, size_b = size_a.ravel(), size_b.ravel()
    for threshold in (0.5, 0.8, 0.85, 0.9):
        got = textsim.lowest_reaching(size_a, size_b, threshold)
        for a, b, lowest in zip(size_a.tolist(), size_b.tolist(), got.tolist()):
            reachable = [i / (a + b - i) for i in range(min(a, b) + 1) if i / (a + b - i) >= threshold - 1e-12]
            assert abs(lowest - min(reachable)) < 1e-12 if reachable else lowest == 2


def test_numbered_copies_of_short_questions_are_not_measured_in_vain(monkeypatch):
    """Short questions, each copied hundreds of times with a number: two copies share 4 of 6
    word 3-grams (0.67), share LSH buckets, and their estimates often pass 0.6; sets of 5
    n-grams reach 0.8 only when equal, so only pairs with equal signatures are measured. The
    pairs found are still exactly those of all pairs, both ways of searching."""
    from factory import textsim

    questions = [f"tell me about topic{q} in brief" for q in range(8)]
    texts = [textsim.normalize(f"{questions[i % 8]} (#{i})") for i in range(800)]
    texts += ["a b c a b c", "a b c a b c a", "x y z w v u t s", "x y z w v u t s r"]  # equal sets; 6 of 7 (0.857)
    sig = textsim.signatures(texts, 3)
    keys = textsim.band_keys(sig, *textsim.lsh_params(0.8))
    low, high = textsim.candidate_pairs(keys)
    assert np.count_nonzero(textsim.estimated_jaccard(textsim.sketch(sig), low, high) >= 0.6) > 5000  # the vain ones
    measured = []
    real = textsim.pair_jaccard
    monkeypatch.setattr(textsim, "pair_jaccard", lambda *args: measured.append(args[2].size) or real(*args))
    grams = [{tuple(t.split()[k:k + 3]) for k in range(len(t.split()) - 2)} for t in texts]
    exact = {(i, j) for i in range(len(texts)) for j in range(i + 1, len(texts))
             if len(grams[i] & grams[j]) >= 0.8 * len(grams[i] | grams[j]) - 1e-9}
    assert exact == {(800, 801), (802, 803)}
    for linking in (False, True):
        measured.clear()
        a, b, similarity = textsim.near_duplicate_pairs(
            keys, textsim.sketch(sig), lambda rows: textsim.ngram_hashes([texts[r] for r in rows], 3), 0.8, linking=linking)
        assert set(zip(a.tolist(), b.tolist())) == exact and sum(measured) < 10
        assert sorted(similarity.round(3).tolist()) == [0.857, 1.0]


def test_a_question_and_its_variants_stay_in_one_split(ws):
    """The split phase on records whose user turns are a question and 300 variants of it (and
    other questions): the variants are grouped with the question, and the check, which
    re-reads the files, finds no near-duplicate across splits."""
    write_input(ws, [record(q, f"Answer {i}") for i, q in enumerate(variants(300, at=200))] + unique_records(300))
    m = run(ws)
    assert m["leakage"]["near_duplicates"] == 0 and m["leakage"]["total"] == 0
    assert m["largest_group"] >= 250


def test_every_record_with_a_dropped_user_turn_is_dropped(ws):
    """dedup.near: drop, when the later of two near-duplicate questions is the user turn of
    several records (other system prompts or answers): every one of them goes, as a duplicate
    of the earlier question's record, not only the first (the others stayed, and the check
    found them beside the question in other splits)."""
    base, near = paraphrases(30)
    records = [record(q, f"Answer A{i}") for i, q in enumerate(base)] + unique_records(200)
    records += [record(q, f"Answer B{i}-{k}", system=f"Prompt {k}") for k in range(4) for i, q in enumerate(near)]
    write_input(ws, records)
    m = run(ws, {"dedup": {"near": "drop"}})
    assert m["leakage"]["total"] == 0
    entries = [orjson.loads(line) for line in ws.duplicates_file.read_bytes().splitlines()]
    near_questions = set(near)
    dropped = [e for e in entries if e["record"]["conversations"][1]["content"] in near_questions]
    assert len(dropped) == m["near_duplicates"]["dropped"] >= 4 * 28
    assert all(e["duplicate_of"]["conversations"][0]["content"] in base and e["duplicate_of_line"] < e["line"]
               for e in dropped)
    written = [rec["conversations"][-2]["content"] for recs in outputs(ws).values() for rec in recs]
    assert sum(q in near_questions for q in written) == 4 * 30 - len(dropped)


def test_pair_jaccard_equals_python_sets_of_word_ngrams(monkeypatch):
    """The numpy Jaccard of candidate pairs against sets of word 3-gram tuples, on texts from a
    small vocabulary (n-grams repeated inside a text, many overlaps), in one run and in many."""
    import random

    from factory import textsim

    rng = random.Random(7)
    texts = [" ".join(rng.choice("abcdefg") for _ in range(rng.randint(3, 40))) for _ in range(300)]
    grams = [{tuple(t.split()[k:k + 3]) for k in range(len(t.split()) - 2)} for t in texts]
    a = np.array([rng.randrange(300) for _ in range(3000)] + [5])
    b = np.array([rng.randrange(300) for _ in range(3000)] + [5])
    expected = [len(grams[i] & grams[j]) / len(grams[i] | grams[j]) for i, j in zip(a.tolist(), b.tolist())]
    for chunk in (textsim.PAIR_CHUNK, 64):
        monkeypatch.setattr(textsim, "PAIR_CHUNK", chunk)
        assert textsim.pair_jaccard(*textsim.ngram_hashes(texts, 3), a, b).tolist() == expected
    assert 0 < np.mean(expected) < 1 and expected[-1] == 1.0


def test_normalize_batch_equals_normalize_text_by_text():
    from factory import textsim

    tricky = ["  A  b\t\nC ", "", " ", "\x1f", "x\u00a0y", "ÉCOLE  ß ﬁ", "\u2028a\u2029", "a\x85", "Σ AΣ",
              " \u3000 ", "e\u0301", "\u0301x", "Ａ Ｂ", "\n\n", "a b", "İ", "x = a + b", "-5", " {\"k\": [1, 2]} ",
              "a\x00b", "\x0b\x0c\r\x1c\x1dz\x1e", "ends  ", "  starts", "Tab\tand\r\nCRLF",
              "a=\u0338b", "\u212aelvin", "A\u030a and e\u0301\u0323 x", "\u1100\u1161\u11a8 K\u0301", "long " * 50 + "Ω\u0345",
              "人工智能，是 计算机。", "ข้อความภาษาไทย ok", "ｶﾀｶﾅ と ひらがな", "\u0e49start", "ข้อ", "中\u3000文", "ÉCOLE中文ß"]
    texts = tricky + [t for r in unique_records(300) for t in (turn["content"] for turn in r["conversations"])]
    expected = [textsim.normalize(t).encode() for t in texts]
    assert textsim.normalize_batch(texts) == expected
    ascii_only = [t for t in texts if t.isascii() and "\x00" not in t]
    assert textsim.normalize_batch(ascii_only) == [textsim.normalize(t).encode() for t in ascii_only]
    assert textsim.normalize_batch([]) == []
    nul = ["é", "Ö\x00é B", "ü Ü", "x"]  # a NUL in a text lower-cased with others (the only NUL of the batch)
    assert textsim.normalize_batch(nul) == [textsim.normalize(t).encode() for t in nul]
    # every character str.split() splits on, inside, around and between non-ASCII words
    spaces = [chr(c) for c in range(0x110000) if chr(c).isspace()]
    mixed = [f"É{s}a{s}{s}ß{s}" for s in spaces] + [f"{s}ﬁ" for s in spaces] + [f"{s}\u00e9{s}x" for s in spaces]
    assert textsim.normalize_batch(mixed) == [textsim.normalize(t).encode() for t in mixed]


def test_texts_of_plain_characters_normalize_as_text_by_text():
    """normalize_batch lower-cases a text whose characters above ASCII are all plain (no NFKC,
    no regular expressions): every such character, and random strings of them with ASCII,
    give what normalize() gives; and the test refuses what needs more."""
    import random

    from factory import textsim

    plain = textsim._plain_text()
    chars = [chr(c) for c in (*range(0x80, 0x3400), *range(0x1F000, 0x1FB00)) if plain(chr(c))]
    assert len(chars) > 5000 and all(plain(c) for c in "é’“–°ñΔ×🚀ö") and "Σ" not in chars
    assert not any(plain(t) for t in ("x²", "a\u00a0b", "ß", "ﬁ", "e\u0301", "İ", "中", "\u1161", "ǅ"))
    rng = random.Random(3)
    texts = [f"X{c}Y {c}{c.upper()}\t{c}" for c in chars]
    texts += ["".join(rng.choice(chars + list("AbZ .\t\n")) for _ in range(rng.randint(1, 30))) for _ in range(20000)]
    assert textsim.normalize_batch(texts) == [textsim.normalize(t).encode() for t in texts]
    # texts that need more, anywhere among plain ones (first, last, side by side, at either end of a text)
    others = ["ß", "ﬁ", "中", "\u00a0", "Σ", "e\u0301", "\u3000", "Ａ"]
    for _ in range(200):
        batch = [rng.choice(others) * rng.randint(0, 1) + "".join(rng.choice(chars[:50] + list("Ab .") + others[:1] * (k % 3 == 0))
                                                                 for _ in range(rng.randint(0, 8))) + rng.choice(others) * (k % 5 == 0)
                 for k in range(rng.randint(1, 12))]
        assert textsim.normalize_batch(batch) == [textsim.normalize(t).encode() for t in batch], batch


# --- the real datasets: an independent re-count ---------------------------------------------

REAL_SPLITS = [("glaive_toolcall_en_demo.json", {}), ("kto_en_demo.json", {}), ("alpaca_en_demo.json", {}),
               ("alpaca_zh_demo.json", {}),
               ("gsm8k/train.jsonl", {"mapping": {"user": "question", "assistant": "answer"}})]


@pytest.mark.datasets
@pytest.mark.parametrize(("name", "settings"), REAL_SPLITS, ids=[r[0] for r in REAL_SPLITS])
def test_real_dataset_has_no_shared_user_turns_and_every_record_is_accounted_for(tmp_path, name, settings):
    from phases.format import PHASE as FORMAT

    datasets = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
    if not (datasets / name).is_file():
        pytest.skip(f"{datasets / name} not present")
    ws = Workspace.at(tmp_path)
    cfg = parse_config({"data": {"inputs": [{"path": str(datasets / name), **settings}]}})
    ctx = PhaseContext(cfg, ws, Progress(), logging.getLogger("test.split"))
    f = FORMAT.run(ctx)
    m = PHASE.run(ctx)
    raw = datasets / name
    count = len(json.loads(raw.read_text())) if raw.suffix == ".json" else len(raw.read_bytes().splitlines())
    assert f["records_in"] == count == f["records_out"] + f["rejected"]
    assert recount_shared_user_turns(ws) == {"train_val": 0, "train_test": 0, "val_test": 0}
    assert m["leakage"]["total"] == 0
    assert recount_lines(ws.formatted_file) == f["records_out"] == \
        sum(recount_lines(ws.split_file(n)) for n in SPLITS) + recount_lines(ws.duplicates_file)
    assert m["accounting"]["balanced"]



ODD_TEXTS = ["ｆｕｌｌ ｗｉｄｔｈ", "e\u0301cole", "école", "ΣΊΣΥΦΟΣ", "straße", "STRASSE", "日本語のテキストです",
             "emoji 🎉🎉 party", "zero\u200bwidth", "tab\there", "nul\x00char", "rtl עברית טקסט", "x = a + b",
             "x = a - b", "-5", "5", '{"a": 1}', '{"a": 2}', "line\r\nbreak", "\u2028sep", "  spaced   out  ",
             "ǅ digraph", "İstanbul", "ﬁ ligature", "a\u0308\u0301 combining", "\u00a0nbsp\u00a0", "back\\slash",
             'quote"s', "🧑‍🤝‍🧑 family", "한국어 문장입니다", "ไทย ข้อความ"]


@pytest.mark.parametrize("seed", [0, 1])
def test_odd_text_in_three_formats_through_the_cli_leaves_no_user_turn_in_two_splits(tmp_path, seed):
    """1,500 records as ShareGPT, OpenAI and Alpaca files, their user turns drawn from 250
    questions (odd Unicode, symbols, a NUL, CJK, whitespace of every kind), copied with case
    and spacing changed or a word replaced, some single- and some multi-turn: `factory run
    split` exits 0, every record is counted, no normalized user turn is in two split files
    (re-counted here with NFKC, casefold and whitespace), and val and test stay alike in size
    although one group holds most records."""
    import random

    rng = random.Random(seed)

    def words(n):
        return " ".join(rng.choice(ODD_TEXTS) if rng.random() < 0.05 else f"w{rng.randrange(3000)}" for _ in range(n))

    questions = [words(rng.choice([1, 2, 5, 8, 12, 30])) for _ in range(250)] + ODD_TEXTS

    def question():
        text, r = rng.choice(questions), rng.random()
        if r < 0.1:
            return text.upper()
        if r < 0.2:
            return "  " + text.replace(" ", " \t ") + "\n"
        if r < 0.3 and text.split():
            changed = text.split()
            changed[rng.randrange(len(changed))] = "changed"
            return " ".join(changed)
        return text

    share, chat, alpaca = [], [], []
    for i in range(1500):
        turns = rng.choice([1, 1, 1, 2, 3])
        pairs = [(question(), f"answer {i}.{k}") for k in range(turns)]
        if i % 3 == 0:
            share.append({"conversations": [t for q, a in pairs for t in ({"from": "human", "value": q},
                                                                          {"from": "gpt", "value": a})]})
        elif i % 3 == 1:
            chat.append({"messages": [t for q, a in pairs for t in ({"role": "user", "content": q},
                                                                    {"role": "assistant", "content": a})]})
        else:
            alpaca.append({"instruction": pairs[0][0] or "say hi", "input": "", "output": pairs[0][1]})
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "share.jsonl").write_text("".join(json.dumps(r, ensure_ascii=bool(seed)) + "\n" for r in share))
    (raw / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    (raw / "alpaca.json").write_text(json.dumps(alpaca, ensure_ascii=False))
    (tmp_path / "factory.yaml").write_text("data:\n  inputs: [data/raw/share.jsonl, data/raw/chat.jsonl, data/raw/alpaca.json]\n")
    ws = run_cli(tmp_path)
    f = json.loads(ws.metrics_file("format").read_text())
    m = json.loads(ws.metrics_file("split").read_text())
    assert recount_lines(ws.formatted_file) + recount_lines(ws.formatted_dir / "rejects.jsonl") == 1500
    assert recount_lines(ws.formatted_file) == sum(recount_lines(ws.split_file(n)) for n in SPLITS) + \
        recount_lines(ws.duplicates_file)
    assert f["accounting"]["balanced"] and m["accounting"]["balanced"]
    assert recount_shared_user_turns(ws) == {"train_val": 0, "train_test": 0, "val_test": 0}
    val, test = recount_lines(ws.split_file("val")), recount_lines(ws.split_file("test"))
    assert m["largest_group"] > 1000 and min(val, test) >= 0.6 * max(val, test) > 0

@contextmanager
def signatures_of_the_formatted_file(ws):
    """(settings, scan, _Signed) of data/formatted/all.jsonl, scanned as one block the way the
    split scans it, in this process; the scan's n-grams spilled until the context ends."""
    from factory import textsim

    settings = split.Settings(seed=parse_config({}).data.split.seed, stratify=None, min_turn_words=0, ngram=3,
                              near=True, threshold=0.8)
    textsim.prepare(settings.threshold)
    split._init_worker(settings)
    with split.SpilledNgrams(ws.formatted_dir) as spilled:
        scan = split._Scan(textsim.lsh_params(settings.threshold)[0], spilled)
        scan.add(split._scan_block((str(ws.formatted_file), 0, ws.formatted_file.stat().st_size, None)))
        scan.finish()
        yield settings, scan, split._Signed(scan, split._NearSearch(scan, np.ones(scan.records, bool)), settings)


def test_a_text_the_scan_did_not_sign_is_signed_afresh_and_both_kinds_mix(ws):
    """The split's check takes each text's signature from the scan (_Signed) and signs one
    the scan did not from its text: band keys, sketches and n-gram hashes equal what
    _user_turns computes for the same texts, whichever way each came, and n-grams asked for
    in any mix of the two."""
    from factory import textsim

    write_input(ws, unique_records(200))
    with signatures_of_the_formatted_file(ws) as (settings, scan, signed):
        seen = [textsim.normalize(f"question number {i}: what is {i} plus {i}?").encode() for i in range(0, 200, 7)]
        unseen = [textsim.normalize(f"a question the scan never read, number {i}, asked here").encode() for i in range(29)]
        texts = [t for pair in zip(unseen, seen) for t in pair]  # afresh, looked up, afresh, ...
        keys = textsim.text_keys(texts, settings.seed)
        assert np.isin(keys, scan.near_key).tolist() == [False, True] * 29
        bands, sketches, ngrams_of = signed.sign(keys, lambda i: texts[i])

        expected = split._user_turns(texts, keys, np.arange(len(texts)), settings, near=True)
        assert np.frombuffer(expected["near_key"], np.uint64).tolist() == keys.tolist()  # every text a row, in order
        assert bands.tobytes() == expected["near_bands"] and sketches.tobytes() == expected["near_sketch"]
        hashes = np.frombuffer(expected["near_ngrams"], np.uint64)
        counts = np.frombuffer(expected["near_ngram_count"], np.int64)
        ends = np.cumsum(counts)
        for rows in (np.arange(len(texts)), np.array([1, 3, 5]), np.array([0, 2]), np.array([2, 3, 4, 40, 57])):
            got, owner = ngrams_of(rows)
            want = np.concatenate([hashes[ends[r] - counts[r]:ends[r]] for r in rows])
            assert got.tolist() == want.tolist()
            assert owner.tolist() == np.repeat(np.arange(rows.size), counts[rows]).tolist()


def test_the_check_with_the_scans_signatures_finds_what_a_check_signing_everything_finds(ws):
    """The split's check with the scan's signatures (_Signed), on split files that hold texts
    the scan read and texts it did not (signed afresh from the files), all near-duplicates of
    each other across the three splits: the same leakage, pairs and examples as
    measure_leakage, which signs every text itself."""
    long_q = "Describe step by step how a bill becomes a law in a parliament with two chambers and a head of state {}"
    questions = [record(long_q.format(f"example {i}"), f"Answer {i}.") for i in range(60)]  # Jaccard 0.9 to each other
    write_input(ws, questions[::2] + unique_records(100))  # what the scan reads: every other question
    ws.splits_dir.mkdir(parents=True)
    for k, name in enumerate(SPLITS):
        ws.split_file(name).write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in questions[k::3]))
    with signatures_of_the_formatted_file(ws) as (settings, _, signed):
        with split._LeakageCheck(ws, settings, signed=signed) as check:
            for k, name in enumerate(SPLITS):
                size = ws.split_file(name).stat().st_size
                check.add(split._check_block((str(ws.split_file(name)), 0, size, k, None, False)))
            leakage = check.result()
    assert leakage == split.measure_leakage(ws, settings)
    across = near_pairs_across_splits(ws.splits_dir)  # 20 x 20 for each pair of splits; LSH finds a pair at 0.89 with p 0.99995
    assert across == 1200 and 0.998 * across <= leakage["near_duplicates"] <= across


@pytest.mark.parametrize("batch", [8, split.KEYED_LINES], ids=["batches-of-8-lines", "one-batch"])
def test_the_check_takes_the_turns_the_scan_read_by_line_and_parses_any_other_line(ws, monkeypatch, batch):
    """With _KnownLines the check keys each line it reads back and, where each is the record
    the write says it put there, takes the user turns the scan parsed from the same bytes: a
    part of such lines gives what parsing it gives (_check_block); a part with a line the scan
    did not read, or another record than the one said, is parsed afresh. Over split files of
    all three, looked up a few parts at a time or all at once, every user turn is found at the
    offset and line parsing finds it, and the leakage equals that of measure_leakage, which
    parses every line."""
    monkeypatch.setattr(split, "KEYED_LINES", batch)
    long_q = "Describe step by step how a bill becomes a law in a parliament with two chambers and a head of state {}"
    questions = [record(long_q.format(f"example {i}"), f"Answer {i}.") for i in range(60)]  # Jaccard 0.9 to each other
    write_input(ws, questions[::2] + unique_records(100))  # what the scan reads: every other question
    read = ws.formatted_file.read_bytes().splitlines(keepends=True)
    ws.splits_dir.mkdir(parents=True)
    said = {}  # (split, offset of a line) -> the record of the formatted file the write would say is there
    for k, name in enumerate(SPLITS):  # lines the scan read, then others
        lines = read[k::3] + [orjson.dumps(r) + b"\n" for r in questions[1::2][k::3]]
        records = list(range(k, len(read), 3)) + [0] * (len(lines) - len(read[k::3]))
        records[7] = records[8]  # a line the scan read, said to be another
        ws.split_file(name).write_bytes(b"".join(lines))
        offsets = np.cumsum([0] + [len(line) for line in lines[:-1]])
        said.update({(k, int(offset)): r for offset, r in zip(offsets, records)})

    def keyed(job):
        part = split._key_lines(job)
        part["scan_records"] = np.array([said[job[3], offset] for offset in np.frombuffer(part["line_offset"], np.int64)])
        return part

    looked_up = parsed = 0
    with signatures_of_the_formatted_file(ws) as (settings, scan, signed):
        known = split._KnownLines(scan)
        with split._LeakageCheck(ws, settings, signed=signed, known=known) as check, \
                split._LeakageCheck(ws, settings, signed=signed) as parsing:
            for k, name in enumerate(SPLITS):
                path = ws.split_file(name)
                for start, end in split._blocks(path, 1 << 10):
                    job = (str(path), start, end, k, None, False)
                    part = known.part(keyed(job))
                    if part is None:
                        parsed += 1
                    else:
                        assert part == split._check_block(job)
                        looked_up += 1
                    check.add(keyed(job))
                    parsing.add(split._check_block(job))
            leakage = check.result()
            for field in ("split", "key", "offset", "line"):  # each user turn, where it is, in file order
                assert check.grown[field] == parsing.grown[field]
    assert looked_up >= 10 and parsed >= 3
    assert leakage == split.measure_leakage(ws, settings) and leakage["near_duplicates"] > 100
