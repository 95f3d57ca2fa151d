"""The split phase on real files: de-duplication, exact ratios, prompt groups that never
cross splits, stratification, leakage measured from the written files, determinism, and
the errors a user can meet. No mocks: each test writes data/formatted/all.jsonl and runs
the phase."""

import hashlib
import json
import logging
from collections import Counter, defaultdict

import orjson
import pytest

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
                                     "sha256": hashlib.sha256(data).hexdigest()}


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
        digests.append({name: m["files"][name]["sha256"] for name in SPLITS})
    assert digests[0] == digests[1]
    assert digests[0]["test"] != digests[2]["test"]


def test_assignment_does_not_depend_on_input_order(tmp_path):
    records = unique_records(200)
    found = []
    for i, order in enumerate((records, records[::-1])):
        ws = Workspace.at(tmp_path / str(i))
        write_input(ws, order)
        run(ws)
        found.append({name: sorted(map(prompt_of, recs)) for name, recs in outputs(ws).items()})
    assert found[0] == found[1]


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


def test_leakage_is_measured_when_prompt_grouping_is_off(ws):
    records = [record(f"Prompt {i % 20}", f"Answer {i}") for i in range(200)]
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


def test_blank_lines_and_a_missing_final_newline(tmp_path):
    lines = [orjson.dumps(r) for r in unique_records(40)]
    for i, chunk_bytes in enumerate((1 << 20, 300)):  # one block; many blocks, some with blank lines
        ws = Workspace.at(tmp_path / str(i))
        ws.formatted_file.parent.mkdir(parents=True)
        ws.formatted_file.write_bytes(b"\n".join(lines[:10]) + b"\n\n\n" + b"\n".join(lines[10:]))
        m = run(ws, chunk_bytes=chunk_bytes)
        assert m["records_in"] == 40 and m["counts"] == {"train": 32, "val": 4, "test": 4}
        written = [ws.split_file(name).read_bytes() for name in SPLITS]
        assert all(data.endswith(b"\n") and b"\n\n" not in data for data in written)
        assert sorted(b"".join(written).splitlines()) == sorted(lines)


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
        results.append([m["files"][name]["sha256"] for name in SPLITS])
    assert results[0] == results[1]


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
