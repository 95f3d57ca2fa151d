"""The format phase on real files: every input shape, every kind of bad record, and the
real datasets in ../shared/datasets (skipped when that folder is absent)."""

from __future__ import annotations

import logging
from pathlib import Path

import orjson
import pytest
import xxhash

from factory.config import parse_config
from factory.errors import InputError
from factory.phase import PhaseContext
from factory.resources import validate
from factory.workspace import Workspace
from phases.format import PHASE

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


class CountingProgress:
    def __init__(self):
        self.started = []
        self.advanced = 0
        self.calls = 0

    def start(self, total, unit):
        self.started.append((total, unit))

    def advance(self, n=1):
        self.advanced += n
        self.calls += 1


def run_format(root: Path, inputs=None, progress=None, workers=None) -> dict:
    """Run the phase on workspace `root`; check the invariants every run must keep."""
    raw = {"data": {**({} if inputs is None else {"inputs": inputs}), **({} if workers is None else {"workers": workers})}}
    progress = progress or CountingProgress()
    ctx = PhaseContext(parse_config(raw), Workspace.at(root), progress, logging.getLogger("test"))
    metrics = PHASE.run(ctx)
    a = metrics["accounting"]
    assert metrics["records_in"] == a["converted"] + metrics["rejected"] + metrics["filtered"]
    assert metrics["records_out"] == a["converted"] + a["extra_from_fan_out"]
    assert sum(metrics["per_reason"].values()) == metrics["rejected"]
    assert len(records(root)) == metrics["records_out"]
    assert len(rejects(root)) == metrics["rejected"]
    assert metrics["output_xxh3_128"] == xxhash.xxh3_128((root / metrics["output"]).read_bytes()).hexdigest()
    assert progress.advanced == metrics["records_out"] + metrics["rejected"] + metrics["filtered"]
    return metrics


def records(root: Path) -> list[dict]:
    return [orjson.loads(line) for line in (root / "data/formatted/all.jsonl").read_bytes().splitlines()]


def rejects(root: Path) -> list[dict]:
    return [orjson.loads(line) for line in (root / "data/formatted/rejects.jsonl").read_bytes().splitlines()]


def write(root: Path, relative: str, content: str | bytes) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def jsonl(*objs) -> bytes:
    return b"".join(orjson.dumps(o) + b"\n" for o in objs)


def turns(*pairs) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


def the_reject(root: Path) -> dict:
    (only,) = rejects(root)
    return only


# --- formats --------------------------------------------------------------------------


def test_alpaca_jsonl_instruction_input_output(tmp_path):
    write(tmp_path, "data/raw/a.jsonl", jsonl(
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
        {"instruction": "Name a colour.", "input": "", "output": "Blue"},
        {"instruction": "Say hi.", "output": "hi"},
    ))
    metrics = run_format(tmp_path)
    assert records(tmp_path) == [
        {"conversations": turns(("system", "Translate to French."), ("user", "cat"), ("assistant", "chat"))},
        # no input: the instruction is the user turn, or Gemma's template finds no user turn
        {"conversations": turns(("user", "Name a colour."), ("assistant", "Blue"))},
        {"conversations": turns(("user", "Say hi."), ("assistant", "hi"))},
    ]
    assert metrics["per_file"]["data/raw/a.jsonl"]["format"] == "alpaca"
    assert metrics["rejected"] == 0 and metrics["rejected_ratio"] == 0
    assert metrics["output"] == "data/formatted/all.jsonl"
    assert metrics["rejects"] == "data/formatted/rejects.jsonl"


def test_alpaca_json_array(tmp_path):
    write(tmp_path, "data/raw/a.json", orjson.dumps([
        {"instruction": "Add.", "input": "1+1", "output": "2", "score": 1.5},
        {"instruction": "Greet.", "input": "", "output": "Hello"},
    ], option=orjson.OPT_INDENT_2))
    run_format(tmp_path)
    assert [r["conversations"][-1]["content"] for r in records(tmp_path)] == ["2", "Hello"]


def test_sharegpt_tool_roles_and_tools_kept(tmp_path):
    record = {
        "system": "You can call functions.",
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
            {"from": "observation", "value": '{"temp": 20}'},
            {"from": "gpt", "value": "It is 20 degrees."},
            {"from": "human", "value": "Thanks"},
            {"from": "gpt", "value": "You're welcome."},
        ],
        "tools": '[{"name": "weather"}]',
    }
    write(tmp_path, "data/raw/chat.json", orjson.dumps([record]))
    metrics = run_format(tmp_path)
    (out,) = records(tmp_path)
    assert [t["role"] for t in out["conversations"]] == ["system", "user", "assistant", "tool", "assistant", "user", "assistant"]
    assert out["tools"] == '[{"name": "weather"}]'
    # the definitions the calls use are in the system turn, which every chat template renders
    assert out["conversations"][0]["content"] == ('You can call functions.\n\nYou have access to the following '
                                                  'functions:\n[{"name":"weather"}]')
    assert metrics["per_file"]["data/raw/chat.json"]["format"] == "sharegpt"


def test_openai_messages_label_goes_to_meta(tmp_path):
    write(tmp_path, "data/raw/m.jsonl", jsonl(
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "label": True},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}, {"role": "assistant", "content": "Hello"}]},
    ))
    metrics = run_format(tmp_path)
    first, second = records(tmp_path)
    assert first == {"conversations": turns(("system", "Be brief."), ("user", "2+2?"), ("assistant", "4")), "meta": {"label": True}}
    assert second["conversations"][0] == {"role": "user", "content": "Hi there"}
    assert metrics["per_file"]["data/raw/m.jsonl"]["format"] == "openai"


def test_prompt_completion(tmp_path):
    write(tmp_path, "data/raw/pc.jsonl", jsonl({"prompt": "Capital of France?", "completion": "Paris"}))
    run_format(tmp_path)
    assert records(tmp_path) == [{"conversations": turns(("user", "Capital of France?"), ("assistant", "Paris"))}]


def test_mapped_jsonl_with_label_map(tmp_path):
    write(tmp_path, "data/raw/q.jsonl", jsonl(
        {"q": "good film", "y": 1},
        {"q": "bad film", "y": 0},
        {"q": "so-so film", "y": 2},
    ))
    inputs = [{"path": "data/raw", "mapping": {"user": "q", "assistant": "y"}, "label_map": {"0": "negative", "1": "positive"}}]
    run_format(tmp_path, inputs)
    assert records(tmp_path) == [
        {"conversations": turns(("user", "good film"), ("assistant", "positive")), "meta": {"label": 1}},
        {"conversations": turns(("user", "bad film"), ("assistant", "negative")), "meta": {"label": 0}},
    ]
    bad = the_reject(tmp_path)
    assert (bad["file"], bad["line"], bad["reason"]) == ("data/raw/q.jsonl", 3, "unmapped_label")
    assert "label_map" in bad["detail"] and "'2'" in bad["detail"]


def test_csv_mapping_with_quoted_multiline_field(tmp_path):
    write(tmp_path, "data/raw/qa.csv", 'question,answer\n"What is\na haiku?","A short, 3-line poem"\nWhy?,Because\n')
    run_format(tmp_path, [{"path": "data/raw", "mapping": {"user": "question", "assistant": "answer"}}])
    assert records(tmp_path) == [
        {"conversations": turns(("user", "What is\na haiku?"), ("assistant", "A short, 3-line poem"))},
        {"conversations": turns(("user", "Why?"), ("assistant", "Because"))},
    ]


def test_tsv_mapping_label_map_and_prompts(tmp_path):
    write(tmp_path, "data/raw/s.tsv", 'sentence\tlabel\n"quoted" start\t1\nflat\t0\n')
    inputs = [{
        "path": "data/raw/s.tsv",
        "mapping": {"user": "sentence", "assistant": "label"},
        "label_map": {"0": "negative", "1": "positive"},
        "system_prompt": "Classify sentiment.",
        "user_template": "Sentiment of: {text}",
    }]
    run_format(tmp_path, inputs)
    first, _ = records(tmp_path)
    assert first == {
        "conversations": turns(("system", "Classify sentiment."), ("user", 'Sentiment of: "quoted" start'), ("assistant", "positive")),
        "meta": {"label": "1"},
    }


def test_csv_without_mapping_is_an_input_error_showing_its_columns(tmp_path):
    write(tmp_path, "data/raw/s.tsv", "sentence\tlabel\nfine\t1\n")
    with pytest.raises(InputError) as e:
        run_format(tmp_path)
    message = str(e.value)
    assert "data/raw/s.tsv" in message and "sentence, label" in message
    assert "mapping: {user: sentence, assistant: label}" in message
    assert not (tmp_path / "data/formatted/all.jsonl").exists()


def test_records_inside_a_document_get_a_records_path_that_reads_them(tmp_path):
    import yaml

    rows = [{"instruction": f"Q{i}", "input": "", "output": f"A{i}"} for i in range(3)]
    write(tmp_path, "data/raw/d.json", orjson.dumps({"version": "1.0", "data": rows}).decode())
    with pytest.raises(InputError, match="`data` holds a list of objects") as e:
        run_format(tmp_path)
    run_format(tmp_path, yaml.safe_load(str(e.value).split("e.g.\n", 1)[1])["data"]["inputs"])
    assert [r["conversations"][-1]["content"] for r in records(tmp_path)] == ["A0", "A1", "A2"]


@pytest.mark.parametrize("layout, field", [
    # lmsys-chat-1m: one conversation per record, under `conversation`
    ([{"conversation_id": "a1", "model": "vicuna-13b", "turn": 1, "language": "English",
       "conversation": [{"content": "Q0 what?", "role": "user"}, {"content": "A0.", "role": "assistant"}]},
      {"conversation_id": "a2", "model": "koala-13b", "turn": 1, "language": "English",
       "conversation": [{"content": "Q1 what?", "role": "user"}, {"content": "A1.", "role": "assistant"}]},
      {"conversation_id": "a3", "model": "vicuna-13b", "turn": 0, "language": "English", "conversation": "lost"}],
     "conversation"),
    # preference data (ultrafeedback_binarized's prefs): the chosen and the rejected conversation
    ([{"prompt": f"Q{i} what?", "score_chosen": 8.0,
       "chosen": [{"role": "user", "content": f"Q{i} what?"}, {"role": "assistant", "content": f"A{i}."}],
       "rejected": [{"role": "user", "content": f"Q{i} what?"}, {"role": "assistant", "content": "No."}]}
      for i in range(2)] + [{"prompt": "Q2", "rejected": []}], "chosen"),
    # Anthropic's hh-rlhf: each conversation a Human/Assistant transcript, the chosen and the rejected
    ([{"chosen": f"\n\nHuman: Q{i} what?\n\nAssistant: A{i}.", "rejected": f"\n\nHuman: Q{i} what?\n\nAssistant: No."}
      for i in range(2)] + [{"chosen": "Q2 what? A2.", "rejected": ""}], "chosen"),
    # ShareGPT-style turns under another name
    ([{"id": i, "dialog": [{"from": "human", "value": f"Q{i} what?"}, {"from": "gpt", "value": f"A{i}."}]}
      for i in range(2)] + [{"id": 2, "dialog": [{"from": "narrator", "value": "x"}]}], "dialog"),
    # Capybara: a conversation written as exchanges
    ([{"source": "Airoboros", "conversation": [{"input": f"Q{i} what?", "output": f"A{i}."}]} for i in range(2)]
     + [{"source": "x", "conversation": [{"input": "Q2", "output": "A2"}, {"input": "Q3"}]}], "conversation"),
])
def test_a_conversation_under_another_field_is_read_with_the_field_the_error_names(tmp_path, layout, field):
    """A list of messages under a field other than messages/conversations was taken for the
    records themselves (the error suggested `records: "conversation[*]"`, which read every turn
    as a record). The error now names the field to paste as `messages`, which reads the
    conversations; a record without it is rejected naming the field."""
    import yaml

    write(tmp_path, "data/raw/d.jsonl", "\n".join(orjson.dumps(r).decode() for r in layout))
    with pytest.raises(InputError, match=f"say which field holds the conversation") as e:
        run_format(tmp_path)
    inputs = yaml.safe_load(str(e.value).split("e.g.\n", 1)[1])["data"]["inputs"]
    assert inputs == [{"path": "data/raw", "messages": field}]
    metrics = run_format(tmp_path, inputs)
    assert [[(t["role"], t["content"]) for t in r["conversations"]] for r in records(tmp_path)] == [
        [("user", f"Q{i} what?"), ("assistant", f"A{i}.")] for i in range(2)]
    assert metrics["records_in"] == 3 and metrics["rejected"] == 1
    (reject,) = rejects(tmp_path)
    assert reject["line"] == 3 and f"{field}" in reject["detail"], reject


def test_a_conversation_written_as_exchanges_keeps_its_turns(tmp_path):
    """Capybara-style conversations, [{input, output}, ...], under `conversations`: read as one
    multi-turn conversation each (were rejected: no role), not a record per exchange."""
    layout = [{"conversations": [{"input": f"Q{i}", "output": f"A{i}"}, {"input": f"Q{i} again", "output": f"B{i}"}]}
              for i in range(3)] + [{"conversations": [{"prompt": "P", "response": "R"}]},
                                    {"conversations": [{"user": "U", "assistant": "V"}]}]
    write(tmp_path, "data/raw/d.jsonl", "\n".join(orjson.dumps(r).decode() for r in layout))
    metrics = run_format(tmp_path)
    assert metrics["rejected"] == 0
    assert [r["conversations"] for r in records(tmp_path)] == [
        turns(("user", f"Q{i}"), ("assistant", f"A{i}"), ("user", f"Q{i} again"), ("assistant", f"B{i}")) for i in range(3)
    ] + [turns(("user", "P"), ("assistant", "R")), turns(("user", "U"), ("assistant", "V"))]


def test_a_layout_without_known_role_fields_gets_placeholders_not_a_guess(tmp_path):
    write(tmp_path, "data/raw/d.jsonl", orjson.dumps({"chosen": "Human: hi Assistant: hello", "rejected": "x"}).decode())
    with pytest.raises(InputError, match=r"mapping: \{user: PROMPT_FIELD, assistant: ANSWER_FIELD\}"):
        run_format(tmp_path)


@pytest.mark.parametrize("layout, expected", [
    # databricks-dolly-15k: the context is empty in most records
    ([{"instruction": "When did Virgin Australia start?", "context": "Virgin Australia began on 31 August 2000.",
       "response": "On 31 August 2000.", "category": "closed_qa"},
      {"instruction": "Name a primary colour.", "context": "", "response": "Red.", "category": "open_qa"}],
     [[("user", "When did Virgin Australia start?\n\nVirgin Australia began on 31 August 2000."),
       ("assistant", "On 31 August 2000.")],
      [("user", "Name a primary colour."), ("assistant", "Red.")]]),
    # OpenOrca
    ([{"id": "niv.1", "system_prompt": "You are an AI assistant.", "question": "2+2?", "response": "4"}],
     [[("system", "You are an AI assistant."), ("user", "2+2?"), ("assistant", "4")]]),
    # MetaMathQA: the original question is not the answer
    ([{"query": "What is 3 times 4?", "response": "It is 12.", "type": "GSM_Rephrased",
       "original_question": "3*4?"}],
     [[("user", "What is 3 times 4?"), ("assistant", "It is 12.")]]),
])
def test_a_layout_known_by_its_field_names_is_read_without_a_mapping(tmp_path, layout, expected):
    """Records of none of the named formats whose fields say their roles (Dolly, OpenOrca,
    MetaMathQA) stopped the run with exit 2 and a mapping to paste. `format: auto` now reads them
    by those names, says which mapping it used in the metrics, and gives the same turns as the
    mapping written out."""
    write(tmp_path, "data/raw/d.jsonl", "".join(orjson.dumps(r).decode() + "\n" for r in layout))
    metrics = run_format(tmp_path)
    assert [r["conversations"] for r in records(tmp_path)] == [turns(*t) for t in expected]
    (stats,) = metrics["per_file"].values()
    assert stats["format"] == "mapped" and metrics["rejected"] == 0
    written_out = run_format(tmp_path, [{"path": "data/raw", "mapping": stats["mapping_by_name"]}])
    assert [r["conversations"] for r in records(tmp_path)] == [turns(*t) for t in expected]
    assert "mapping_by_name" not in written_out["per_file"]["data/raw/d.jsonl"]


def test_a_large_file_read_by_field_names_in_ranges_gives_the_bytes_of_one_pass(tmp_path, monkeypatch):
    """Worker processes read a large file's ranges with the mapping its first records gave; a
    range whose own first records name no answer (here 60 records without `response`, each a
    reject) crashed with exit 3 when each range chose for itself."""
    import phases.format as fmt

    rows = [{"instruction": f"Say {i}.", "context": "" if i % 3 else f"Context {i}.", "category": "open_qa",
             **({} if 100 <= i < 160 else {"response": f"{i}"})} for i in range(400)]
    content = "".join(orjson.dumps(r).decode() + "\n" for r in rows)
    write(tmp_path / "one", "data/raw/d.jsonl", content)
    serial = run_format(tmp_path / "one")
    monkeypatch.setattr(fmt, "RANGE_BYTES", 700)
    write(tmp_path / "ranges", "data/raw/d.jsonl", content)
    progress = CountingProgress()
    parallel = run_format(tmp_path / "ranges", progress=progress, workers=2)
    assert progress.calls > 10  # the ranges were used
    for name in ("all.jsonl", "rejects.jsonl"):
        assert (tmp_path / "ranges/data/formatted" / name).read_bytes() == (tmp_path / "one/data/formatted" / name).read_bytes()
    drop = ("seconds", "output_xxh3_128")
    assert {k: v for k, v in parallel.items() if k not in drop} == {k: v for k, v in serial.items() if k not in drop}
    assert serial["rejected"] == 60 and serial["per_file"]["data/raw/d.jsonl"]["mapping_by_name"] == {
        "user": ["instruction", "context"], "assistant": "response"}


@pytest.mark.parametrize("layout", [
    [{"question": "2+2?", "answer": "4", "response": "four"}],  # two fields could be the answer
    [{"sentence": "a fine film", "label": "1"}],  # a label's words are the user's choice (label_map)
    [{"sentence": "a fine film", "response": "x"}],  # a sentence may be either side
    # Hugging Face's squad: the answer is inside an object of lists
    [{"id": "5733be28", "title": "Paris", "context": "Paris is in France.", "question": "Where is Paris?",
      "answers": {"answer_start": [12], "text": ["France"]}}],
])
def test_a_layout_whose_roles_its_names_do_not_settle_gets_a_mapping_to_fill_in(tmp_path, layout):
    """No guess where the names are ambiguous: the error's suggested mapping, pasted into the
    config as a user would, reads the records (a nested answer by its path, quoted for YAML)."""
    import yaml

    write(tmp_path, "data/raw/d.jsonl", "".join(orjson.dumps(r).decode() + "\n" for r in layout))
    with pytest.raises(InputError, match="cannot tell the format") as e:
        run_format(tmp_path)
    suggested = yaml.safe_load(str(e.value).split("e.g.\n", 1)[1])["data"]["inputs"]
    run_format(tmp_path, suggested)
    assert len(records(tmp_path)) == len(layout)
    if "answers" in layout[0]:
        assert suggested[0]["mapping"] == {"user": ["context", "question"], "assistant": "answers.text[0]"}
        assert records(tmp_path)[0]["conversations"][-1] == {"role": "assistant", "content": "France"}


def test_csv_short_first_row_is_a_reject_not_a_header_problem(tmp_path):
    write(tmp_path, "data/raw/s.csv", "sentence,label\nno label here\nfine,1\n")
    run_format(tmp_path, [{"path": "data/raw", "mapping": {"user": "sentence", "assistant": "label"}}])
    assert [(r["line"], r["reason"]) for r in rejects(tmp_path)] == [(2, "missing_field")]
    assert records(tmp_path) == [{"conversations": turns(("user", "fine"), ("assistant", "1"))}]


def test_csv_mapping_naming_a_missing_column(tmp_path):
    write(tmp_path, "data/raw/s.csv", "text,label\nfine,1\n")
    with pytest.raises(InputError, match=r"data/raw/s.csv.*sentence.*text, label"):
        run_format(tmp_path, [{"path": "data/raw", "mapping": {"user": "sentence", "assistant": "label"}}])


def test_text_folder_one_document_per_file(tmp_path):
    write(tmp_path, "data/raw/corpus/b.txt", "Second document.\r\nTwo lines.\r\n")
    write(tmp_path, "data/raw/corpus/a.txt", "First document.")
    write(tmp_path, "data/raw/corpus/empty.txt", "  \n")
    metrics = run_format(tmp_path)
    assert records(tmp_path) == [
        {"conversations": [{"role": "assistant", "content": "First document."}]},
        {"conversations": [{"role": "assistant", "content": "Second document.\nTwo lines.\n"}]},
    ]
    bad = the_reject(tmp_path)
    assert (bad["file"], bad["reason"]) == ("data/raw/corpus/empty.txt", "empty_record")
    assert metrics["per_file"]["data/raw/corpus/a.txt"]["format"] == "text"


def test_single_top_level_object_is_one_record(tmp_path):
    write(tmp_path, "data/raw/one.json", b'{\n  "prompt": "p",\n  "completion": "c"\n}\n')
    assert run_format(tmp_path)["records_out"] == 1


def test_explicit_format_overrides_detection(tmp_path):
    write(tmp_path, "data/raw/t.jsonl", jsonl({"text": "a document", "id": 1}))
    run_format(tmp_path, [{"path": "data/raw", "format": "text"}])
    assert records(tmp_path) == [{"conversations": [{"role": "assistant", "content": "a document"}]}]


def test_undetectable_format_names_file_keys_and_fix(tmp_path):
    write(tmp_path, "data/raw/q.jsonl", jsonl({"q": "q", "a": "a"}))
    with pytest.raises(InputError) as e:
        run_format(tmp_path)
    message = str(e.value)
    assert "data/raw/q.jsonl" in message and "q, a" in message
    assert "data.inputs" in message and "factory.yaml" in message


def test_an_error_in_a_later_file_leaves_no_partial_output(tmp_path):
    write(tmp_path, "data/raw/a.jsonl", jsonl({"prompt": "p", "completion": "c"}))
    write(tmp_path, "data/raw/b.jsonl", jsonl({"q": "q", "a": "a"}))
    with pytest.raises(InputError, match="b.jsonl"):
        run_format(tmp_path)
    formatted = tmp_path / "data/formatted"
    assert sorted(p.name for p in formatted.iterdir()) == []


def test_folders_recursive_sorted_hidden_and_other_extensions_skipped(tmp_path):
    write(tmp_path, "data/raw/b/z.jsonl", jsonl({"prompt": "3", "completion": "c"}))
    write(tmp_path, "data/raw/a.jsonl", jsonl({"prompt": "1", "completion": "c"}))
    write(tmp_path, "data/raw/b/a.jsonl", jsonl({"prompt": "2", "completion": "c"}))
    write(tmp_path, "data/raw/.hidden.jsonl", jsonl({"prompt": "hidden", "completion": "c"}))
    write(tmp_path, "data/raw/.cache/x.jsonl", jsonl({"prompt": "hidden", "completion": "c"}))
    write(tmp_path, "data/raw/notes.md", "# notes")
    metrics = run_format(tmp_path)
    assert [r["conversations"][0]["content"] for r in records(tmp_path)] == ["1", "2", "3"]
    assert list(metrics["per_file"]) == ["data/raw/a.jsonl", "data/raw/b/a.jsonl", "data/raw/b/z.jsonl"]
    assert metrics["skipped_files"] == ["data/raw/notes.md"]


def test_compressed_files_are_read_and_a_cut_one_is_recorded_incomplete(tmp_path):
    """Hub and GitHub datasets often come as .jsonl.gz, .json.xz or .csv.bz2: read as they are,
    not skipped; a download cut short (a gzip stream without its end) is a file not read to
    its end, with the records read so far kept and the data-valid gate failing."""
    import bz2
    import gzip
    import lzma

    rows = [{"instruction": f"Question {i} about rivers", "input": "", "output": f"Answer {i}. " * 30} for i in range(2000)]
    lines = b"".join(orjson.dumps(r) + b"\n" for r in rows)
    write(tmp_path, "data/raw/a.jsonl.gz", gzip.compress(lines))
    write(tmp_path, "data/raw/b.json.xz", lzma.compress(orjson.dumps(rows[:50])))
    write(tmp_path, "data/raw/c.csv.bz2", bz2.compress(b"question,answer\n" + b"".join(f"q{i},a{i}\n".encode() for i in range(50))))
    csv_input = {"path": "data/raw/c.csv.bz2", "mapping": {"user": "question", "assistant": "answer"}}
    metrics = run_format(tmp_path, [csv_input, "data/raw"])  # the first input naming a file reads it
    assert {f: (m["format"], m["records_out"]) for f, m in metrics["per_file"].items()} == {
        "data/raw/c.csv.bz2": ("mapped", 50), "data/raw/a.jsonl.gz": ("alpaca", 2000), "data/raw/b.json.xz": ("alpaca", 50)}
    assert metrics["incomplete_files"] == [] and metrics["skipped_files"] == []
    assert records(tmp_path)[50 + 1999]["conversations"][0]["content"] == "Question 1999 about rivers"

    (tmp_path / "data/raw/b.json.xz").unlink()
    (tmp_path / "data/raw/c.csv.bz2").unlink()
    whole = gzip.compress(lines)
    write(tmp_path, "data/raw/a.jsonl.gz", whole[: len(whole) // 2])
    metrics = run_format(tmp_path)
    (cut,) = metrics["incomplete_files"]
    read = metrics["records_in"]
    assert cut["file"] == "data/raw/a.jsonl.gz" and cut["reason"] == "truncated_file" and cut["records_lost"] is None
    assert 0 < read < 2000 and cut["at"] >= read and "download or copy it again" in cut["detail"]
    assert [r["conversations"][0]["content"] for r in records(tmp_path)[-1:]] == [f"Question {read - 1} about rivers"]
    assert not metrics["accounting"]["balanced"]


def test_input_folder_containing_outputs_does_not_read_them(tmp_path):
    write(tmp_path, "data/raw/a.jsonl", jsonl({"prompt": "p", "completion": "c"}))
    run_format(tmp_path, ["data"])
    metrics = run_format(tmp_path, ["data"])  # second run: data/formatted/all.jsonl now exists
    assert list(metrics["per_file"]) == ["data/raw/a.jsonl"]


def test_an_input_that_is_an_output_of_the_factory_is_refused_and_left_whole(tmp_path):
    """format removes its last all.jsonl as it starts writing the new one: named as an input,
    it is refused before anything is removed, with the key and the fix."""
    write(tmp_path, "data/raw/a.jsonl", jsonl({"prompt": "p", "completion": "c"}))
    run_format(tmp_path)
    before = (tmp_path / "data/formatted/all.jsonl").read_bytes()
    for path in ("data/formatted/all.jsonl", "data/formatted/../formatted/all.jsonl"):
        with pytest.raises(InputError, match=r"data\.inputs\[1\]\.path: .*output of the factory.*data/raw/"):
            run_format(tmp_path, ["data/raw", path])
    assert (tmp_path / "data/formatted/all.jsonl").read_bytes() == before


def test_several_inputs_each_with_its_own_settings(tmp_path):
    write(tmp_path, "raw1/a.jsonl", jsonl({"instruction": "i", "input": "x", "output": "o"}))
    write(tmp_path, "raw2/b.csv", "q,a\nquestion,answer\n")
    metrics = run_format(tmp_path, ["raw1", {"path": "raw2", "mapping": {"user": "q", "assistant": "a"}, "system_prompt": "S"}])
    assert metrics["records_out"] == 2
    assert records(tmp_path)[1] == {"conversations": turns(("system", "S"), ("user", "question"), ("assistant", "answer"))}


def test_system_prompt_goes_before_a_records_own_system_turn(tmp_path):
    write(tmp_path, "data/raw/a.jsonl", jsonl({"instruction": "Own.", "input": "x", "output": "y"}))
    run_format(tmp_path, [{"path": "data/raw", "system_prompt": "Global."}])
    assert records(tmp_path)[0]["conversations"][0] == {"role": "system", "content": "Global.\n\nOwn."}


# --- bad records: each goes to rejects.jsonl with its location, reason and a fix ----------


def test_each_bad_jsonl_line_is_rejected_with_line_reason_and_detail(tmp_path):
    good = orjson.dumps({"instruction": "i", "input": "x", "output": "o"})
    lines = [
        good,                                                        # 1 ok
        b'{"instruction": "i", "output": }',                        # 2 invalid_json
        b'{"instruction": "caf\xe9", "output": "o"}',                # 3 undecodable (latin-1)
        b'["a", "list"]',                                            # 4 wrong_type (record)
        b'{"instruction": "i", "input": 5, "output": "o"}',          # 5 wrong_type (field)
        b'{"instruction": "i", "input": "x"}',                       # 6 missing_field
        b'{"instruction": "i", "input": "x", "output": "  "}',       # 7 empty_assistant
        b'{"instruction": "", "input": "", "output": "o"}',          # 8 missing_field (no prompt)
        b"",                                                         # 9 blank: not a record
        good,                                                        # 10 ok
        b'{"instruction": "i", "input": "x", "output": "o"',         # 11 truncated_json
    ]
    write(tmp_path, "data/raw/a.jsonl", b"\n".join(lines))
    metrics = run_format(tmp_path)
    got = [(r["file"], r["line"], r["reason"]) for r in rejects(tmp_path)]
    assert got == [
        ("data/raw/a.jsonl", 2, "invalid_json"),
        ("data/raw/a.jsonl", 3, "undecodable"),
        ("data/raw/a.jsonl", 4, "wrong_type"),
        ("data/raw/a.jsonl", 5, "wrong_type"),
        ("data/raw/a.jsonl", 6, "missing_field"),
        ("data/raw/a.jsonl", 7, "empty_assistant"),
        ("data/raw/a.jsonl", 8, "missing_field"),
        ("data/raw/a.jsonl", 11, "truncated_json"),
    ]
    by_line = {r["line"]: r for r in rejects(tmp_path)}
    assert "UTF-8" in by_line[3]["detail"] and "0xe9" in by_line[3]["detail"]
    assert "array" in by_line[4]["detail"]
    assert "`input`" in by_line[5]["detail"] and "string" in by_line[5]["detail"]
    assert "`output`" in by_line[6]["detail"]
    assert "`output` is empty" in by_line[7]["detail"]
    assert by_line[2]["raw"] == '{"instruction": "i", "output": }'
    assert metrics["records_in"] == 10 and metrics["records_out"] == 2 and metrics["rejected"] == 8
    assert metrics["rejected_ratio"] == 0.8
    assert metrics["per_reason"] == {
        "empty_assistant": 1, "invalid_json": 1, "missing_field": 2, "truncated_json": 1, "undecodable": 1, "wrong_type": 2,
    }
    assert metrics["per_file"]["data/raw/a.jsonl"]["reasons"] == metrics["per_reason"]


def test_raw_is_cut_to_300_characters(tmp_path):
    write(tmp_path, "data/raw/a.jsonl", b'{"bad": ' + b"x" * 1000 + b"\n")
    run_format(tmp_path)
    assert the_reject(tmp_path)["raw"] == '{"bad": ' + "x" * 292


def test_truncated_json_array_keeps_the_records_before_the_break(tmp_path):
    items = [{"instruction": f"i{n}", "input": "", "output": "o"} for n in range(3)]
    text = orjson.dumps(items)
    write(tmp_path, "data/raw/a.json", text[: len(text) - 20])  # cut inside the third record
    metrics = run_format(tmp_path)
    assert [r["conversations"][0]["content"] for r in records(tmp_path)] == ["i0", "i1"]
    bad = the_reject(tmp_path)
    assert (bad["file"], bad["index"], bad["reason"]) == ("data/raw/a.json", 2, "truncated_json")
    assert "record 2" in bad["detail"] and bad["raw"]
    assert metrics["records_in"] == 3


def test_invalid_json_array_is_rejected_at_its_index(tmp_path):
    write(tmp_path, "data/raw/a.json", b'[{"prompt": "p", "completion": "c"}, {"prompt": oops}]')
    run_format(tmp_path)
    bad = the_reject(tmp_path)
    assert (bad["index"], bad["reason"]) == (1, "invalid_json")


def test_json_array_items_of_the_wrong_type(tmp_path):
    write(tmp_path, "data/raw/a.json", b'[{"prompt": "p", "completion": "c"}, "just a string", {"prompt": "p", "completion": 7}]')
    run_format(tmp_path)
    assert [(r["index"], r["reason"]) for r in rejects(tmp_path)] == [(1, "wrong_type"), (2, "wrong_type")]
    assert rejects(tmp_path)[0]["raw"] == '"just a string"'


def test_role_order_unknown_role_and_empty_conversations(tmp_path):
    write(tmp_path, "data/raw/c.jsonl", jsonl(
        {"conversations": [{"from": "gpt", "value": "I speak first"}, {"from": "human", "value": "hm"}]},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}]},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "observation", "value": "b"}, {"from": "gpt", "value": "c"}]},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]},
        {"conversations": []},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}]},
        {"conversations": "not a list"},
    ))
    run_format(tmp_path, [{"path": "data/raw", "format": "sharegpt"}])
    got = [(r["line"], r["reason"]) for r in rejects(tmp_path)]
    assert got == [
        (1, "role_order"), (2, "role_order"), (3, "role_order"), (4, "unknown_role"),
        (5, "empty_record"), (6, "empty_assistant"), (7, "wrong_type"),
    ]
    details = [r["detail"] for r in rejects(tmp_path)]
    assert "assistant, user" in details[0] and "expected an optional system turn" in details[0]
    assert "'robot'" in details[3] and "human" in details[3]


def test_assistant_names_of_public_chat_data_are_assistant_turns(tmp_path):
    """Vicuna's ShareGPT crawl names answers chatgpt, bing or bard; Gemini-style messages name the
    assistant `model`. They were rejected as unknown roles."""
    write(tmp_path, "data/raw/c.jsonl", jsonl(
        *({"conversations": [{"from": "human", "value": f"q {name}"}, {"from": name, "value": "a"}]}
          for name in ("chatgpt", "bing", "bard", "model"))))
    write(tmp_path, "data/raw/m.jsonl", jsonl({"messages": [{"role": "user", "content": "q"}, {"role": "model", "content": "a"}]}))
    metrics = run_format(tmp_path)
    assert metrics["rejected"] == 0 and metrics["records_out"] == 5
    assert {r["conversations"][1]["role"] for r in records(tmp_path)} == {"assistant"}


def test_openai_bad_roles(tmp_path):
    write(tmp_path, "data/raw/m.jsonl", jsonl(
        {"messages": [{"role": "user", "content": "q"}]},
        {"messages": [{"role": "narrator", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]},
    ))
    run_format(tmp_path)
    assert [(r["line"], r["reason"]) for r in rejects(tmp_path)] == [(1, "role_order"), (2, "unknown_role"), (3, "missing_field")]


def test_csv_bad_rows(tmp_path):
    content = b"question,answer\nok,fine\nbad \xff byte,x\nonly question\nq,a,extra\nq,\n"
    write(tmp_path, "data/raw/qa.csv", content)
    run_format(tmp_path, [{"path": "data/raw", "mapping": {"user": "question", "assistant": "answer"}}])
    got = [(r["file"], r["line"], r["reason"]) for r in rejects(tmp_path)]
    assert got == [
        ("data/raw/qa.csv", 3, "undecodable"),
        ("data/raw/qa.csv", 4, "missing_field"),
        ("data/raw/qa.csv", 5, "wrong_type"),
        ("data/raw/qa.csv", 6, "empty_assistant"),
    ]
    assert rejects(tmp_path)[2]["raw"] == "q,a,extra"
    assert "`answer`" in rejects(tmp_path)[1]["detail"]


# --- encodings and empty input -------------------------------------------------------------


def test_bom_and_crlf_per_format(tmp_path):
    bom = b"\xef\xbb\xbf"
    write(tmp_path, "raw/a.jsonl", bom + b'{"prompt": "p1", "completion": "c1"}\r\n{"prompt": "p2", "completion": "c2"}\r\n')
    write(tmp_path, "raw/c.json", bom + b'[{"prompt": "p4",\r\n "completion": "c4"}]\r\n')
    write(tmp_path, "csv/b.csv", bom + b'q,a\r\n"multi\r\nline",c3\r\n')
    metrics = run_format(tmp_path, ["raw", {"path": "csv", "mapping": {"user": "q", "assistant": "a"}}])
    assert metrics["rejected"] == 0
    assert [r["conversations"][0]["content"] for r in records(tmp_path)] == ["p1", "p2", "p4", "multi\r\nline"]


def test_no_input_files_is_an_input_error(tmp_path):
    (tmp_path / "data/raw").mkdir(parents=True)
    write(tmp_path, "data/raw/readme.md", "nothing here")
    with pytest.raises(InputError) as e:
        run_format(tmp_path)
    assert "data/raw" in str(e.value) and ".jsonl/.json/.csv/.tsv/.txt" in str(e.value) and "data.inputs" in str(e.value)


def test_files_without_records_are_an_input_error(tmp_path):
    write(tmp_path, "data/raw/a.jsonl", "\n\n")
    write(tmp_path, "data/raw/b.json", "[]")
    write(tmp_path, "data/raw/c.csv", "q,a\n")
    with pytest.raises(InputError, match=r"no records found in data/raw/a.jsonl, data/raw/b.json, data/raw/c.csv"):
        run_format(tmp_path, [{"path": "data/raw", "mapping": {"user": "q", "assistant": "a"}}])
    assert not (tmp_path / "data/formatted/all.jsonl").exists()


def test_missing_input_path_is_named(tmp_path):
    with pytest.raises(InputError, match=r"data\.inputs\[0\]\.path: nowhere/data does not exist"):
        run_format(tmp_path, ["nowhere/data"])


# --- output contract ---------------------------------------------------------------------


def test_every_output_line_matches_the_record_schema_and_runs_are_deterministic(tmp_path):
    write(tmp_path, "data/raw/a.jsonl", jsonl({"instruction": "i", "input": "x", "output": "o"}, {"instruction": "i", "input": "", "output": "o"}))
    write(tmp_path, "data/raw/b.json", orjson.dumps([{"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}], "tools": "[]x"}]))
    write(tmp_path, "data/raw/c.jsonl", jsonl({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], "label": False}))
    write(tmp_path, "data/raw/d.jsonl", jsonl({"prompt": "p", "completion": "c", "system": "s"}))
    write(tmp_path, "data/raw/e.txt", "a document")
    first = run_format(tmp_path)
    for record in records(tmp_path):
        validate(record, "record")
    assert first["records_out"] == 6
    first_bytes = (tmp_path / "data/formatted/all.jsonl").read_bytes()
    second = run_format(tmp_path)
    assert second["output_xxh3_128"] == first["output_xxh3_128"]
    assert (tmp_path / "data/formatted/all.jsonl").read_bytes() == first_bytes


def test_progress_is_reported_in_batches(tmp_path):
    write(tmp_path, "data/raw/a.jsonl", jsonl(*[{"prompt": str(n), "completion": "c"} for n in range(12_000)]))
    progress = CountingProgress()
    run_format(tmp_path, progress=progress)
    assert progress.started == [(None, "records")]
    assert progress.advanced == 12_000 and progress.calls <= 5


def test_phase_declares_inputs_and_outputs(tmp_path):
    ws = Workspace.at(tmp_path)
    cfg = parse_config({"data": {"inputs": ["data/raw", "/abs/file.jsonl"]}})
    assert PHASE.name == "format" and PHASE.metrics == "format" and PHASE.config_sections == ("data",)
    assert PHASE.inputs(cfg, ws) == [ws.root / "data/raw", Path("/abs/file.jsonl")]
    assert PHASE.outputs(cfg, ws) == [ws.formatted_file, ws.rejects_file]


# --- the real datasets -------------------------------------------------------------------

REAL = [
    ("alpaca_en_demo.json", {}, "alpaca", 999),
    ("alpaca_zh_demo.json", {}, "alpaca", 1000),
    ("glaive_toolcall_en_demo.json", {}, "sharegpt", 300),
    ("kto_en_demo.json", {}, "openai", 300),
    ("sst2/dev.tsv", {"mapping": {"user": "sentence", "assistant": "label"}, "label_map": {"0": "negative", "1": "positive"}}, "mapped", None),
    ("gsm8k/test.jsonl", {"mapping": {"user": "question", "assistant": "answer"}}, "mapped", 1319),
]


@pytest.mark.parametrize(("name", "settings", "fmt", "count"), REAL, ids=[r[0] for r in REAL])
@pytest.mark.datasets
@pytest.mark.skipif(not DATASETS.is_dir(), reason=f"{DATASETS} not present")
def test_real_dataset(tmp_path, name, settings, fmt, count):
    source = DATASETS / name
    if count is None:  # a TSV: one record per line after the header
        count = len(source.read_bytes().splitlines()) - 1
    metrics = run_format(tmp_path, [{"path": str(source), **settings}])
    assert metrics["records_in"] == count and metrics["rejected"] == 0
    assert metrics["per_file"][str(source)]["format"] == fmt
    out = records(tmp_path)
    for record in out[:: max(1, len(out) // 150)]:  # jsonschema is slow; a spread sample
        validate(record, "record")
    if name.startswith("glaive"):
        assert all(isinstance(r["tools"], str) for r in out)
        assert any(t["role"] == "tool" for r in out for t in r["conversations"])
        # every function a record defines is named in the system turn it trains with
        raw = orjson.loads(source.read_bytes())
        assert len(raw) == len(out) and sum(bool(r.get("tools")) for r in raw) > 100
        for given, record in zip(raw, out):
            names = [f["name"] for f in orjson.loads(given["tools"])] if given.get("tools") else []
            system = record["conversations"][0]["content"] if record["conversations"][0]["role"] == "system" else ""
            assert all(f'"name":"{name}"' in system for name in names), (names, system[:200])
    if name.startswith("kto"):
        assert {r["meta"]["label"] for r in out} == {True, False}
    if name.startswith("sst2"):
        assert {r["conversations"][-1]["content"] for r in out} == {"negative", "positive"}
        assert {r["meta"]["label"] for r in out} == {"0", "1"}



def test_alpaca_system_and_history_are_kept(tmp_path):
    write(tmp_path, "data/raw/a.jsonl", jsonl(
        {"instruction": "Translate.", "input": "chat", "output": "cat", "system": "You are terse.",
         "history": [["Translate: chien", "dog"]]},
        {"instruction": "x", "output": "y", "history": "oops"},
    ))
    metrics = run_format(tmp_path)
    assert records(tmp_path)[0]["conversations"] == [
        {"role": "system", "content": "You are terse.\n\nTranslate."},
        *turns(("user", "Translate: chien"), ("assistant", "dog"), ("user", "chat"), ("assistant", "cat")),
    ]
    assert metrics["per_reason"] == {"wrong_type": 1} and the_reject(tmp_path)["line"] == 2


# --- nested and other sources, each in its real layout -------------------------------------


def test_oasst_message_trees_best_path_and_all_paths(tmp_path):
    def msg(role, text, rank=None, replies=(), **extra):
        return {"message_id": text, "role": role, "text": text, "rank": rank, "replies": list(replies), **extra}

    tree = {"message_tree_id": "t1", "tree_state": "ready_for_export", "prompt": msg("prompter", "What is 2+2?", replies=[
        msg("assistant", "4", rank=0, replies=[msg("prompter", "Why?", rank=0, replies=[msg("assistant", "Arithmetic.", rank=0)])]),
        msg("assistant", "Four.", rank=1, replies=[msg("prompter", "Thanks", rank=0)]),
        msg("assistant", "5", rank=None, deleted=True),
    ])}
    unanswered = {"message_tree_id": "t2", "prompt": msg("prompter", "Anyone?")}
    write(tmp_path, "data/raw/trees.jsonl", jsonl(tree, unanswered))
    metrics = run_format(tmp_path)
    assert metrics["per_file"]["data/raw/trees.jsonl"]["format"] == "oasst"
    assert records(tmp_path) == [{"conversations": turns(("user", "What is 2+2?"), ("assistant", "4"), ("user", "Why?"),
                                                         ("assistant", "Arithmetic."))}]
    assert the_reject(tmp_path)["line"] == 2
    run_format(tmp_path, [{"path": "data/raw", "format": "oasst", "tree_paths": "all"}])
    assert [[t["content"] for t in r["conversations"]] for r in records(tmp_path)] == [
        ["What is 2+2?", "4", "Why?", "Arithmetic."], ["What is 2+2?", "Four."]]


def test_squad_nested_json_with_a_records_path(tmp_path):
    squad = {"version": "v2.0", "data": [{"title": "Paris", "paragraphs": [
        {"context": "Paris is the capital of France.", "qas": [
            {"id": "1", "question": "What is the capital of France?", "answers": [{"text": "Paris", "answer_start": 0}]},
            {"id": "2", "question": "Is Paris in Spain?", "answers": [], "is_impossible": True}]},
        {"context": "The Seine flows through Paris.", "qas": [
            {"id": "3", "question": "Which river flows through Paris?", "answers": [{"text": "The Seine", "answer_start": 0}]}]},
    ]}]}
    write(tmp_path, "data/raw/squad.json", orjson.dumps(squad))
    inputs = [{"path": "data/raw", "records": "data[*].paragraphs[*]",
               "mapping": {"user": ["context", "qas[*].question"], "assistant": "qas[*].answers[0].text"}}]
    metrics = run_format(tmp_path, inputs)
    assert records(tmp_path) == [
        {"conversations": turns(("user", "Paris is the capital of France.\n\nWhat is the capital of France?"), ("assistant", "Paris"))},
        {"conversations": turns(("user", "The Seine flows through Paris.\n\nWhich river flows through Paris?"), ("assistant", "The Seine"))},
    ]
    bad = the_reject(tmp_path)  # the unanswerable question: no answers[0]
    assert (bad["index"], bad["element"], bad["reason"]) == (0, 1, "missing_field")
    assert metrics["records_in"] == 3 and metrics["accounting"]["balanced"]


def test_csv_and_tsv_without_header_by_column_number(tmp_path):
    write(tmp_path, "data/raw/a.tsv", "a great film\t1\na dull film\t0\n")
    write(tmp_path, "data/raw/b.csv", '"x, y",point\n')
    run_format(tmp_path, [{"path": "data/raw", "header": False, "mapping": {"user": 0, "assistant": 1}}])
    assert [[t["content"] for t in r["conversations"]] for r in records(tmp_path)] == [
        ["a great film", "1"], ["a dull film", "0"], ["x, y", "point"]]


def test_answers_in_a_nested_list_self_instruct_layout(tmp_path):
    tasks = [{"id": "seed_task_0", "instruction": "Give an antonym.", "instances": [
        {"input": "hot", "output": ["cold", "chilly"]}, {"input": "big", "output": ["small"]}], "is_classification": False}]
    write(tmp_path, "data/raw/seed_tasks.jsonl", jsonl(*tasks))
    inputs = [{"path": "data/raw", "mapping": {"system": "instruction", "user": "instances[*].input",
                                               "assistant": "instances[*].output[0]"}}]
    metrics = run_format(tmp_path, inputs)
    assert records(tmp_path) == [
        {"conversations": turns(("system", "Give an antonym."), ("user", "hot"), ("assistant", "cold"))},
        {"conversations": turns(("system", "Give an antonym."), ("user", "big"), ("assistant", "small"))},
    ]
    assert metrics["records_in"] == 2


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data/raw/train.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"question": ["1+1?", "2+2?", None], "answer": ["2", "4", "6"],
                             "meta": [{"src": "a"}, {"src": "b"}, {"src": "c"}]}), path, row_group_size=2)
    run_format(tmp_path, [{"path": "data/raw", "mapping": {"user": "question", "assistant": "answer"}}])
    assert [[t["content"] for t in r["conversations"]] for r in records(tmp_path)] == [["1+1?", "2"], ["2+2?", "4"]]
    assert (the_reject(tmp_path)["row"], the_reject(tmp_path)["reason"]) == (2, "missing_field")
    run_format(tmp_path, [{"path": "data/raw", "mapping": {"user": "meta.src", "assistant": "answer"}}])
    assert records(tmp_path)[0]["conversations"][0]["content"] == "a"


def test_a_transform_module_per_input(tmp_path):
    write(tmp_path, "my_transforms.py", (
        "def to_chat(record):\n"
        "    if record.get('skip'):\n        return None\n"
        "    if record.get('boom'):\n        raise ValueError('no dialogue')\n"
        "    return [{'prompt': q, 'completion': a} for q, a in record['dialogue']]\n"))
    write(tmp_path, "data/raw/d.jsonl", jsonl({"dialogue": [["hi", "hello"], ["bye", "ciao"]]}, {"skip": True}, {"boom": 1}))
    metrics = run_format(tmp_path, [{"path": "data/raw", "transform": "my_transforms:to_chat"}])
    assert [[t["content"] for t in r["conversations"]] for r in records(tmp_path)] == [["hi", "hello"], ["bye", "ciao"]]
    assert metrics["filtered"] == 1 and the_reject(tmp_path)["reason"] == "transform_error"
    assert "no dialogue" in the_reject(tmp_path)["detail"]
    a = metrics["accounting"]
    assert (a["records_in"], a["converted"], a["rejected"], a["filtered"], a["records_out"], a["extra_from_fan_out"]) == (3, 1, 1, 1, 2, 1)
    with pytest.raises(InputError, match="cannot import 'nowhere'"):
        run_format(tmp_path, [{"path": "data/raw", "transform": "nowhere:f"}])


# --- files that cannot be read to their end ------------------------------------------------


def data_valid(root: Path) -> dict:
    from factory.gates import check_gate, load_gates
    from factory.io import write_json

    ws = Workspace.at(root)
    write_json(ws.metrics_file("format"), run_format(root))
    return check_gate(load_gates(ws, parse_config({}))["data-valid"], ws, {"format": "format"})


def test_a_json_array_that_breaks_is_recorded_as_incomplete_and_fails_data_valid(tmp_path):
    items = [{"instruction": f"i{n}", "input": "", "output": "o"} for n in range(200)]
    text = orjson.dumps(items)
    write(tmp_path, "data/raw/a.json", text[:len(text) // 2] + b"\x00garbage" + text[len(text) // 2:])
    result = data_valid(tmp_path)
    metrics = orjson.loads((tmp_path / "metrics/format.json").read_bytes())
    (incomplete,) = metrics["incomplete_files"]
    assert incomplete["file"] == "data/raw/a.json" and incomplete["records_lost"] is None
    assert incomplete["reason"] == "invalid_json" and 0 < incomplete["at"] < 200
    assert incomplete["detail"].count(f"record {incomplete['at']}") == 1, incomplete["detail"]  # said once
    assert metrics["accounting"]["files_with_unknown_loss"] == ["data/raw/a.json"]
    assert result["passed"] is False
    row = next(c for c in result["criteria"] if c["metric"] == "format.files_incomplete")
    assert (row["observed"], row["passed"]) == (1, False)


def test_utf16_without_bom_and_a_cut_jsonl_file(tmp_path):
    lines = "".join(orjson.dumps({"prompt": f"p{n}", "completion": "c"}).decode() + "\n" for n in range(150))
    write(tmp_path, "data/raw/a.jsonl", lines.encode())
    write(tmp_path, "data/raw/b.jsonl", lines.encode("utf-16-le"))
    write(tmp_path, "data/raw/c.jsonl", lines.encode()[:-10])
    result = data_valid(tmp_path)
    metrics = orjson.loads((tmp_path / "metrics/format.json").read_bytes())
    by_file = {x["file"]: x for x in metrics["incomplete_files"]}
    assert by_file["data/raw/b.jsonl"]["reason"] == "encoding" and "UTF-16" in by_file["data/raw/b.jsonl"]["detail"]
    assert by_file["data/raw/c.jsonl"]["reason"] == "truncated_file"
    assert metrics["per_file"]["data/raw/b.jsonl"]["records_in"] == 0
    assert metrics["records_out"] == 299 and result["passed"] is False


def test_auto_format_votes_over_the_first_records_and_rejects_a_bad_first_one(tmp_path):
    write(tmp_path, "data/raw/a.jsonl", jsonl({"question": "odd one"}, *[{"prompt": f"p{n}", "completion": "c"} for n in range(5)]))
    metrics = run_format(tmp_path)
    assert metrics["per_file"]["data/raw/a.jsonl"]["format"] == "prompt_completion"
    assert (the_reject(tmp_path)["line"], the_reject(tmp_path)["reason"]) == (1, "missing_field")
    assert metrics["records_out"] == 5


@pytest.mark.datasets
@pytest.mark.skipif(not DATASETS.is_dir(), reason=f"{DATASETS} not present")
def test_real_datasets_every_record_accounted_for(tmp_path):
    """Raw records counted with plain json/csv: records_in = converted + rejected + filtered."""
    import csv as csv_module
    import json

    names = ["alpaca_en_demo.json", "alpaca_zh_demo.json", "alpaca_tiny.json", "glaive_toolcall_en_demo.json",
             "kto_en_demo.json", "gsm8k/test.jsonl", "sst2/dev.tsv"]
    expected = 0
    for name in names:
        path = DATASETS / name
        if path.suffix == ".json":
            expected += len(json.loads(path.read_text()))
        elif path.suffix == ".jsonl":
            expected += sum(1 for line in path.read_text().splitlines() if line.strip())
        else:
            expected += sum(1 for _ in csv_module.reader(path.open(), delimiter="\t", quoting=csv_module.QUOTE_NONE)) - 1
    inputs = [{"path": str(DATASETS / n)} for n in names[:5]] + [
        {"path": str(DATASETS / "gsm8k/test.jsonl"), "mapping": {"user": "question", "assistant": "answer"}},
        {"path": str(DATASETS / "sst2/dev.tsv"), "mapping": {"user": "sentence", "assistant": "label"}}]
    metrics = run_format(tmp_path, inputs)
    a = metrics["accounting"]
    assert metrics["records_in"] == expected == a["converted"] + a["rejected"] + a["filtered"]
    assert a["balanced"] and metrics["files_incomplete"] == 0
    assert len(records(tmp_path)) == a["records_out"] == a["converted"] + a["extra_from_fan_out"]


def test_a_large_jsonl_file_converted_in_ranges_by_workers_gives_the_bytes_of_one_pass(tmp_path, monkeypatch, caplog):
    """Large JSONL files are cut into line ranges for worker processes (two here, with ranges
    of about 700 bytes): the output, the rejects with their line numbers, the counts and the
    cut-off last line must be exactly those of one pass over the file, with the workers
    forked or, beside another thread (the CLI's progress display), spawned."""
    import threading

    import phases.format as fmt

    good = [orjson.dumps({"instruction": f"i{n}", "input": "x" * (n % 7), "output": f"o{n}"}) for n in range(400)]
    bad = [b'{"instruction": "i", "output": }', b'{"instruction": "caf\xe9", "output": "o"}', b'["a", "list"]',
           b'{"instruction": "i", "input": 5, "output": "o"}', b"", b"   ", b'{"instruction": "i", "input": "x"}']
    lines = [b'{"question": "a bad first record"}'] + [line for n, g in enumerate(good) for line in ([g, bad[n % 7]] if n % 9 == 0 else [g])]
    content = b"\xef\xbb\xbf" + b"\n".join(lines) + b'\n{"instruction": "i", "output": "cut'
    second = b"\n".join(good[:150]) + b"\n"  # a second file: its ranges go after the first file's records
    one_pass = tmp_path / "one"
    write(one_pass, "data/raw/a.jsonl", content)
    write(one_pass, "data/raw/b.jsonl", second)
    serial = run_format(one_pass)
    monkeypatch.setattr(fmt, "RANGE_BYTES", 700)
    drop = ("seconds",)
    for beside_a_thread in (False, True):
        in_ranges = tmp_path / f"ranges-{beside_a_thread}"
        write(in_ranges, "data/raw/a.jsonl", content)
        write(in_ranges, "data/raw/b.jsonl", second)
        stop = threading.Event()
        helper = threading.Thread(target=stop.wait)
        if beside_a_thread:
            helper.start()
        progress = CountingProgress()
        caplog.clear()
        try:
            with caplog.at_level(logging.INFO):
                parallel = run_format(in_ranges, progress=progress, workers=2)
        finally:
            stop.set()
        assert progress.calls > 10  # advanced once per range: the ranges were used
        assert "format: 2 worker processes (spawn)" in caplog.text or not beside_a_thread
        assert sorted(p.name for p in (in_ranges / "data/formatted").iterdir()) == ["all.jsonl", "rejects.jsonl"]
        for name in ("all.jsonl", "rejects.jsonl"):
            assert (in_ranges / "data/formatted" / name).read_bytes() == (one_pass / "data/formatted" / name).read_bytes()
        assert {k: v for k, v in parallel.items() if k not in drop} == {k: v for k, v in serial.items() if k not in drop}
        assert parallel["output_xxh3_128"] == xxhash.xxh3_128((in_ranges / "data/formatted/all.jsonl").read_bytes()).hexdigest()
    blank = sum(1 for n in range(0, 400, 9) if not bad[n % 7].strip())
    assert serial["per_file"]["data/raw/a.jsonl"]["format"] == "alpaca" and serial["rejected"] == 1 + 45 - blank + 1
    assert serial["incomplete_files"][0]["reason"] == "truncated_file"
    assert serial["per_file"]["data/raw/b.jsonl"]["records_out"] == 150
    monkeypatch.undo()  # a small file again: one pass
    left = one_pass / "data/formatted/.all.jsonl.ranges.partial"  # as a run killed outright leaves it
    left.mkdir()
    (left / "3.jsonl").write_bytes(b"{}")
    run_format(one_pass)  # one pass, no ranges: still removed
    assert not left.exists()


def _oasst_message_table() -> list[dict]:
    """Rows as OpenAssistant/oasst1 and oasst2 have them on the hub (one message a row; their
    other columns, such as lang or emojis, left out), children before their parents sometimes."""
    def row(mid, parent, tree, role, text, rank=None, **extra):
        return {"message_id": mid, "parent_id": parent, "message_tree_id": tree, "role": role, "text": text,
                "rank": rank, "deleted": False, "review_result": True, "lang": "en", **extra}

    return [
        row("a1", "p1", "t1", "assistant", "Second best answer.", rank=1),
        row("p1", None, "t1", "prompter", "What is a river?"),
        row("a0", "p1", "t1", "assistant", "Flowing water.", rank=0),
        row("f0", "a0", "t1", "prompter", "And a lake?"),
        row("g0", "f0", "t1", "assistant", "Still water."),
        row("x0", "p1", "t1", "assistant", "Deleted reply.", rank=2, deleted=True),
        row("p2", None, "t2", "prompter", "Name a colour."),
        row("b0", "p2", "t2", "assistant", "Red."),
        row("o1", "missing", "t3", "assistant", "A reply whose prompt is in another file."),
    ]


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_an_oasst_message_table_is_read_as_trees(tmp_path, kind):
    """The hub's OpenAssistant layout (a message a row, linked by parent_id) gives the same
    conversations as its trees: every row was a tree of one message, and all were rejected."""
    rows = _oasst_message_table()
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        (tmp_path / "data/raw").mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data/raw/train.parquet")
    else:
        write(tmp_path, "data/raw/train.jsonl", "".join(orjson.dumps(r).decode() + "\n" for r in rows))
    metrics = run_format(tmp_path)
    assert [r["conversations"] for r in records(tmp_path)] == [
        turns(("user", "What is a river?"), ("assistant", "Flowing water."), ("user", "And a lake?"),
              ("assistant", "Still water.")),
        turns(("user", "Name a colour."), ("assistant", "Red.")),
    ]
    assert [(r["reason"], "o1" in r["detail"]) for r in rejects(tmp_path)] == [("orphan_message", True)]
    assert metrics["per_file"][f"data/raw/train.{kind}"]["format"] == "oasst" and metrics["records_in"] == 3

    metrics = run_format(tmp_path, [{"path": "data/raw", "tree_paths": "all"}])
    assert sorted(r["conversations"][1]["content"] for r in records(tmp_path)) == [
        "Flowing water.", "Red.", "Second best answer."]


# --- hub datasets: hf://datasets/OWNER/NAME[/PATTERN], through the hub cache -------------------


def _hub_cache_with_dataset(cache: Path, repo: str, commit: str, files: dict[str, list[dict]]) -> None:
    """The hub cache's layout for a downloaded dataset (huggingface_hub's, documented): the commit
    of `main` in refs/, the files under snapshots/<commit>/."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo_dir = cache / f"datasets--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    for name, rows in files.items():
        path = repo_dir / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), path)


def test_a_hub_dataset_is_read_from_the_hub_cache_train_split_by_default(tmp_path):
    """`hf://datasets/OWNER/NAME` reads the train split's files, as the hub's loader names them,
    from the hub cache (offline here: huggingface_hub's own snapshot_download finds them); a
    pattern picks files; a new commit of the dataset makes format run again; a dataset neither
    reachable nor cached is exit 2 naming the input and how to work offline."""
    import subprocess
    import sys

    import yaml

    def messages(prefix, n):
        return [{"messages": [{"role": "user", "content": f"{prefix} question {i}?"},
                              {"role": "assistant", "content": f"{prefix} answer {i}."}]} for i in range(n)]

    cache, ws = tmp_path / "hub", tmp_path / "ws"
    ws.mkdir()
    _hub_cache_with_dataset(cache, "acme/chat-data", "a" * 40, {"data/train-00000-of-00001.parquet": messages("train", 150),
                                                                  "data/test-00000-of-00001.parquet": messages("test", 20)})
    env = {**__import__("os").environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}

    def run(inputs):
        (ws / "factory.yaml").write_text(yaml.safe_dump({"data": {"inputs": inputs}}))
        return subprocess.run([sys.executable, "-m", "factory", "run", "format", "-C", str(ws)], capture_output=True,
                              text=True, env=env, timeout=300)

    proc = run(["hf://datasets/acme/chat-data"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = orjson.loads((ws / "metrics" / "format.json").read_bytes())
    assert list(metrics["per_file"]) == ["hf://datasets/acme/chat-data/data/train-00000-of-00001.parquet"]
    assert metrics["records_out"] == 150 and records(ws)[0]["conversations"][0]["content"] == "train question 0?"
    assert "format: skipped" in run(["hf://datasets/acme/chat-data"]).stderr  # the same commit: unchanged

    _hub_cache_with_dataset(cache, "acme/chat-data", "b" * 40, {"data/train-00000-of-00001.parquet": messages("new", 160)})
    proc = run(["hf://datasets/acme/chat-data"])
    assert proc.returncode == 0 and "format: skipped" not in proc.stderr, proc.stderr[-2000:]
    assert orjson.loads((ws / "metrics" / "format.json").read_bytes())["records_out"] == 160

    _hub_cache_with_dataset(cache, "acme/chat-data", "a" * 40, {})  # main back at the first commit
    proc = run(["hf://datasets/acme/chat-data/data/test-*.parquet", "hf://datasets/acme/chat-data/data/train-*"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(orjson.loads((ws / "metrics" / "format.json").read_bytes())["per_file"]) == [
        "hf://datasets/acme/chat-data/data/test-00000-of-00001.parquet",
        "hf://datasets/acme/chat-data/data/train-00000-of-00001.parquet"]

    proc = run(["hf://datasets/acme/not-downloaded"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "hf://datasets/acme/not-downloaded" in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr


def test_a_hub_datasets_card_decides_which_files_are_its_train_split(tmp_path):
    """A dataset card's `configs` say which files each split is, as `datasets` reads them. By
    file name alone, UltraChat's layout (train_sft and train_gen) and SmolTalk's (the `all`
    configuration beside the ones it merges) were read whole: two tasks mixed, or every record
    twice. Now the default configuration's train files are read; a card with no train split,
    or several configurations and no default, is exit 2 listing the URIs to choose from."""
    import subprocess
    import sys

    import yaml

    def messages(prefix, n):
        return [{"messages": [{"role": "user", "content": f"{prefix} question {i}?"},
                              {"role": "assistant", "content": f"{prefix} answer {i}."}]} for i in range(n)]

    def card(repo, configs):
        folder = cache / f"datasets--{repo.replace('/', '--')}" / "snapshots" / ("c" * 40)
        (folder / "README.md").write_text(f"---\n{yaml.safe_dump({'configs': configs})}---\n# {repo}\n")

    cache, ws = tmp_path / "hub", tmp_path / "ws"
    ws.mkdir()
    _hub_cache_with_dataset(cache, "acme/ultra", "c" * 40, {
        "data/train_sft-00000-of-00001.parquet": messages("sft", 120),
        "data/train_gen-00000-of-00001.parquet": messages("gen", 130),
        "data/test_sft-00000-of-00001.parquet": messages("test", 20)})
    card("acme/ultra", [{"config_name": "default", "data_files": [
        {"split": "train_sft", "path": "data/train_sft-*"}, {"split": "test_sft", "path": "data/test_sft-*"},
        {"split": "train_gen", "path": "data/train_gen-*"}]}])
    _hub_cache_with_dataset(cache, "acme/talk", "c" * 40, {
        "data/all/train-00000-of-00001.parquet": messages("all", 150),
        "data/small/train-00000-of-00001.parquet": messages("all", 150)[:60]})
    talk = [{"config_name": "all", "data_files": [{"split": "train", "path": "data/all/train-*"}]},
            {"config_name": "small", "data_files": "data/small/train-*"}]
    card("acme/talk", talk)
    env = {**__import__("os").environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}

    def run(inputs):
        (ws / "factory.yaml").write_text(yaml.safe_dump({"data": {"inputs": inputs}}))
        return subprocess.run([sys.executable, "-m", "factory", "run", "format", "-C", str(ws)], capture_output=True,
                              text=True, env=env, timeout=300)

    def files_read():
        return list(orjson.loads((ws / "metrics" / "format.json").read_bytes())["per_file"])

    proc = run(["hf://datasets/acme/ultra"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for split in ("train_sft", "test_sft", "train_gen"):
        assert f"{split}: hf://datasets/acme/ultra/data/{split}-*" in proc.stderr
    proc = run(["hf://datasets/acme/ultra/data/train_sft-*"])  # pasted from the message
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert files_read() == ["hf://datasets/acme/ultra/data/train_sft-00000-of-00001.parquet"]

    proc = run(["hf://datasets/acme/talk"])
    assert proc.returncode == 2 and "2 configurations and none is the default" in proc.stderr, proc.stderr[-2000:]
    assert "all: hf://datasets/acme/talk/data/all/train-*; small: hf://datasets/acme/talk/data/small/train-*" in proc.stderr
    talk[0]["default"] = True
    card("acme/talk", talk)
    proc = run(["hf://datasets/acme/talk"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert files_read() == ["hf://datasets/acme/talk/data/all/train-00000-of-00001.parquet"]
    assert orjson.loads((ws / "metrics" / "format.json").read_bytes())["records_out"] == 150

    # a benchmark named by its hub name is its test split: 7 of its test prompts are in the data,
    # and every prompt of its train split is too (which must not count)
    _hub_cache_with_dataset(cache, "acme/bench", "c" * 40, {
        "data/train-00000-of-00001.parquet": messages("all", 150)[20:],
        "data/test-00000-of-00001.parquet": messages("all", 7) + messages("unseen", 30)})
    card("acme/bench", [{"config_name": "main", "data_files": [
        {"split": "train", "path": "data/train-*"}, {"split": "test", "path": "data/test-*"}]}])
    (ws / "factory.yaml").write_text(yaml.safe_dump({"data": {
        "inputs": ["hf://datasets/acme/talk"], "decontaminate": {"benchmarks": ["hf://datasets/acme/bench"]},
        "split": {"train": 0.6, "val": 0.1, "test": 0.3}}}))
    proc = subprocess.run([sys.executable, "-m", "factory", "run", "split", "-C", str(ws)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = orjson.loads((ws / "metrics" / "split.json").read_bytes())["decontamination"]["found"]
    assert sum(found.values()) == 7, found
