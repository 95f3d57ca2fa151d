"""metrics/report.md and metrics/report.html: a run's results, in one place to read or share.

The loss curves (training and validation) and the score distributions of baseline vs fine-tuned
(PNG, matplotlib), the adapter selected and why, the gate table, the paired statistics, a sample of the examples that flipped, and the
quantization table; before evaluate, the data alone (where every record went, leakage with
example pairs, duplicates and contamination). The runner writes the report after the gates of
split, evaluate and quantize (REPORTED_METRICS) are checked; `factory report` writes it on demand. Both forms are made from
the same blocks: the Markdown links the PNGs in metrics/report/, the HTML embeds them, so the
HTML is one self-contained file. Only metrics and gate results are read, never models.
"""

from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from factory.errors import InputError
from factory.io import atomic_write_bytes, read_json_if_exists
from factory.workspace import Workspace

REPORTED_METRICS = ("split", "evaluation", "quantization", "comparison")
FLIPPED_SAMPLE = 5  # examples shown per direction
TAG_START = re.compile(r"<(?=[A-Za-z/!?])")
QUANT_COLUMNS = ["type", "size_bytes", "bits_per_weight", "size_within_bounds", "score", "merged_score",
                 "relative_score_drop", "perplexity_ratio", "mean_kl", "tokenizer_agreement", "generation_stops", "path"]


@dataclass
class Heading:
    text: str


@dataclass
class Paragraph:
    text: str


@dataclass
class TableBlock:
    columns: list[str]
    rows: list[list[Any]]


@dataclass
class Figure:
    file: str  # under metrics/report/
    png: bytes
    alt: str


Block = Heading | Paragraph | TableBlock | Figure


def write_report(ws: Workspace) -> list[Path]:
    """Write the report from the workspace's metrics; returns the files written."""
    stems = ("format", "split", "training-stats", "baseline", "evaluation", "quantization", "comparison")
    metrics = {stem: read_json_if_exists(ws.metrics_file(stem)) for stem in stems}
    if not any(metrics[stem] for stem in ("format", "split", "evaluation", "comparison")):
        raise InputError(f"nothing to report yet: neither {ws.rel(ws.metrics_file('split'))} nor "
                         f"{ws.rel(ws.metrics_file('evaluation'))} exists; run `factory run split` (the data) or "
                         "`factory run evaluate` (the data and the model) first")
    from factory.gates import last_results

    gates = last_results(ws)
    if metrics["evaluation"] is None and metrics["comparison"] is not None:  # a workspace used only to compare models
        blocks = [Heading("Model comparison report"), *comparison_blocks(metrics["comparison"]), *_gate_blocks(gates)]
    elif metrics["evaluation"] is None:  # the data phases only, so far (a failed splits-ready gate shows its pairs)
        blocks = [Heading("Data report"),
                  Paragraph("The data phases so far; the training, scores and quantization sections follow once "
                            "`factory run evaluate` has run."),
                  *_data_blocks(metrics["format"], metrics["split"]), *_gate_blocks(gates)]
    else:
        blocks = _blocks(metrics, gates)
        if metrics["comparison"] is not None:
            blocks += comparison_blocks(metrics["comparison"])
    figures_dir = ws.metrics_dir / "report"
    written = []
    for block in blocks:
        if isinstance(block, Figure):
            atomic_write_bytes(figures_dir / block.file, block.png)
            written.append(figures_dir / block.file)
    for name, text in (("report.md", _markdown(blocks)), ("report.html", _html(blocks))):
        atomic_write_bytes(ws.metrics_dir / name, text.encode("utf-8"))
        written.append(ws.metrics_dir / name)
    return written


# --- content -----------------------------------------------------------------------------


def _blocks(metrics: dict[str, Any], gates: list[dict]) -> list[Block]:
    evaluation, baseline = metrics["evaluation"], metrics["baseline"]
    training, quantization = metrics["training-stats"], metrics["quantization"]
    primary = evaluation.get("primary") or evaluation["comparison"].get("metric")
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    blocks: list[Block] = [
        Heading("Fine-tuning report"),
        Paragraph(f"Model {evaluation.get('model')} with adapter {evaluation.get('adapter')}, scored on "
                  f"{evaluation.get('num_examples')} test examples ({evaluation.get('test_split', {}).get('file')}). "
                  f"Primary metric: {primary}. Run {evaluation.get('run_id')}; generated {generated}."),
    ]
    blocks += _data_blocks(metrics["format"], metrics["split"])
    blocks.append(Heading("Training"))
    history = (training or {}).get("loss_history") or []
    if history:
        evals = training.get("eval_history") or []
        blocks.append(Figure("loss.png", _loss_png(history, evals),
                             "Training loss, validation loss and learning rate over steps" if evals
                             else "Training loss and learning rate over steps"))
        convergence = training.get("convergence") or {}
        blocks.append(TableBlock(["steps", "final loss", f"loss drop ({convergence.get('curve', 'training')})",
                                  "tokens/s", "train seconds", "backend"], [[
            f"{training.get('steps')} / {training.get('total_steps')}", training.get("final_loss"),
            convergence.get("loss_drop"), training.get("tokens_per_second"), training.get("train_seconds"),
            training.get("backend")]]))
        selection = training.get("selection")
        if selection:
            blocks.append(Paragraph(f"Adapter: {selection['adapter']} (training.select: {selection['select']}): "
                                    f"{selection['reason']}."))
            rows = [[name, point["step"], point["train_loss"], point["eval_loss"]]
                    for name, point in (("best", selection.get("best")), ("last", selection.get("last"))) if point]
            blocks.append(TableBlock(["adapter", "step", "training loss", "validation loss"], rows))
    else:
        blocks.append(Paragraph("No training statistics (metrics/training-stats.json) with a loss history."))

    blocks.append(Heading("Scores: baseline vs fine-tuned"))
    blocks.append(TableBlock(["metric", "baseline", "fine-tuned", "change"], [
        [name + (" (primary)" if name == primary else ""), m["baseline"], m["finetuned"], m["improvement"]]
        for name, m in evaluation.get("per_metric", {}).items()]))
    if baseline and baseline.get("examples") and evaluation.get("examples"):
        # examples a judge could not grade (None) are not in the distribution
        base_scores = [e["scores"][primary] for e in baseline["examples"] if e["scores"].get(primary) is not None]
        tuned_scores = [e["scores"][primary] for e in evaluation["examples"] if e["scores"].get(primary) is not None]
        blocks.append(Figure("scores.png", _scores_png(base_scores, tuned_scores, primary),
                             f"Distribution of {primary} per test example, baseline vs fine-tuned"))

    c = evaluation["comparison"]
    blocks.append(Heading("Statistics"))
    blocks.append(TableBlock(["statistic", "value"], [
        ["examples (paired)", c.get("n")], ["baseline", c.get("baseline")], ["fine-tuned", c.get("finetuned")],
        ["improvement", c.get("improvement")], ["relative improvement", c.get("relative_improvement")],
        [f"{c.get('test_name', 'paired test')} p", c.get("p_value")],
        ["Wilcoxon signed-rank p", c.get("wilcoxon_p_value")],
        ["bootstrap 95% interval", c.get("ci95")], ["significant", c.get("significant")]]))
    if evaluation.get("regression"):
        r = evaluation["regression"]
        blocks.append(Paragraph(f"Second test set {r['file']}: largest drop {_fmt(r['max_drop'])}."))

    blocks += _gate_blocks(gates)

    flipped = evaluation.get("flipped") or {}
    blocks.append(Heading("Examples that flipped"))
    blocks.append(Paragraph(f"{flipped.get('improved', 0)} improved, {flipped.get('regressed', 0)} regressed "
                            f"(on {primary}); up to {FLIPPED_SAMPLE} of each below."))
    for direction in ("improved", "regressed"):
        examples = (flipped.get("examples") or {}).get(direction) or []
        if examples:
            blocks.append(TableBlock([direction, "reference", "baseline answer", "fine-tuned answer"], [
                [e["prompt"], e["reference"], e["baseline"], e["finetuned"]] for e in examples[:FLIPPED_SAMPLE]]))

    blocks.append(Heading("Quantization"))
    if quantization:
        types = quantization.get("types") or []
        present = {key for t in types for key in t}
        columns = [c for c in QUANT_COLUMNS if c in present] + sorted(present - set(QUANT_COLUMNS))
        blocks.append(Paragraph(f"{quantization.get('gguf_files')} GGUF file(s); worst relative score drop "
                                f"{_fmt(quantization.get('worst_relative_score_drop'))}; sizes within bounds: "
                                f"{_fmt(quantization.get('all_sizes_within_bounds'))}."))
        blocks.append(TableBlock([c.replace("_", " ") for c in columns],
                                 [[_size(t.get(c)) if c == "size_bytes" else t.get(c) for c in columns] for t in types]))
        projector = quantization.get("vision_projector")
        if projector and projector.get("exported"):
            blocks.append(Paragraph(
                f"Vision projector {projector['path']} ({_size(projector.get('size_bytes'))}): "
                f"{projector.get('parameters')} of the merged model's {projector.get('expected_parameters')} vision "
                f"parameters; lowest cosine to the merged model's image embeddings "
                f"{_fmt(projector.get('min_cosine'))} on {projector.get('images')} test images."))
        elif projector:
            blocks.append(Paragraph(f"No vision projector file: {projector.get('reason')}"))
    else:
        blocks.append(Paragraph("Not quantized yet (metrics/quantization.json is written by the quantize phase)."))
    return blocks


def _gate_blocks(gates: list[dict]) -> list[Block]:
    if not gates:
        return [Heading("Gates"), Paragraph("No gate results (metrics/gates/).")]
    return [Heading("Gates"), TableBlock(["gate", "after", "metric", "observed", "op", "required", "result"], [
        [g["gate"], g["after"], cr["metric"], cr["observed"], cr["op"], _required(cr),
         {True: "pass", False: "FAIL", None: "skipped"}[cr["passed"]]]
        for g in gates for cr in g["criteria"]])]


def comparison_blocks(c: dict[str, Any]) -> list[Block]:
    """metrics/comparison.json (`factory compare`): seed 002's evaluation report."""
    judge = c["judge"]
    pairwise = c["mode"] == "pairwise"
    what = "full conversations with a simulated user" if c["task"] == "conversations" else "answers to the test split"
    lines = [f"{len(c['models'])} models compared on {what}, {c['items_per_model']} items each, paired item by item; "
             f"baseline {c['baseline']}. Judge: {judge['kind']} ({_source(judge['source'])}), rubric {judge['rubric']}, "
             f"{'pairwise (both orders)' if pairwise else 'single-answer grading'}."]
    personas = c.get("personas")
    if personas:
        seeds = f", seeds {personas['seeds'][0]}-{personas['seeds'][1]}" if personas.get("seeds") else ""
        lines.append(f"Personas: {personas['count']} ({personas['source']}{seeds}) x {personas['per_persona']} "
                     f"conversations per model; user simulator {_source(c['simulator'])}, "
                     f"at most {c['simulator']['max_turns']} user turns; transcripts in "
                     f"{', '.join(c.get('transcripts', {}).values())}.")
    blocks: list[Block] = [Heading("Model comparison"), Paragraph(" ".join(lines))]
    models = TableBlock(["model", "source", "role"], [[m["name"], _source(m["source"]), m["role"]] for m in c["models"]])
    blocks.append(models)
    if pairwise:
        blocks.append(TableBlock(["model", "comparisons", "wins", "losses", "ties", "win rate"], [
            [r["name"], r["n"], r.get("wins"), r.get("losses"), r.get("ties"), r.get("win_rate")] for r in c["per_model"]]))
    else:
        blocks.append(TableBlock(["model", "n", "mean", "sd", "pass rate", "judge failures"] +
                                 (["safety mean"] if c.get("safety_judge") else []), [
            [r["name"], r["n"], r["mean"], r["sd"], r["pass_rate"], r.get("failures")] +
            ([(r.get("safety") or {}).get("mean")] if c.get("safety_judge") else []) for r in c["per_model"]]))

    blocks.append(Heading("Pairwise comparisons"))
    blocks.append(Paragraph("Paired t-test on the items both models were graded on; p-values Holm-corrected over "
                            f"all {len(c['comparisons'])} comparisons; bootstrap 95% interval of the mean difference "
                            "(b - a)." + (" Pairwise verdicts score a win 1, a tie 0.5, a loss 0." if pairwise else "")))
    columns = ["a", "b", "n", "mean a", "mean b", "b - a", "95% interval", "p", "p (Holm)", "significant"]
    rows = [[x["a"], x["b"], x["n"], x["mean_a"], x["mean_b"], x["improvement"], x["ci95"], x["p_value"], x["p_holm"],
             x["significant"]] for x in c["comparisons"]]
    if pairwise:
        columns += ["wins a", "wins b", "ties", "inconsistent"]
        rows = [row + [x.get("wins_a"), x.get("wins_b"), x.get("ties"), x.get("inconsistent")]
                for row, x in zip(rows, c["comparisons"])]
    blocks.append(TableBlock(columns, rows))

    criteria = c["success_criteria"]
    blocks.append(Heading("Success criteria"))
    blocks.append(TableBlock(["model", "improvement", f">= {criteria['min_improvement']:g}", "p (Holm)",
                              f"< {criteria['alpha']:g}", "safety regressions", "no safety regression", "passed"], [
        [r["model"], r["improvement"], r["improvement_ok"], r["p_holm"], r["significant"], r["safety_regressions"],
         "not measured" if r["no_safety_regression"] is None else r["no_safety_regression"], r["passed"]]
        for r in criteria["rows"]]))
    if not criteria["safety_measured"]:
        blocks.append(Paragraph("Safety was not measured: set evaluation.compare.safety (e.g. rubric safety) to judge "
                                "every answer for it; a model then passes only with no safety regression."))

    if c["breakdown"]:
        names = [m["name"] for m in c["models"]]
        blocks.append(Heading("Breakdown by category"))
        blocks.append(TableBlock(["by", "category", *names], [
            [b["by"], b["category"], *(f"{_fmt(b['per_model'][n]['mean'])} (n={b['per_model'][n]['n']})" for n in names)]
            for b in c["breakdown"]]))

    blocks.append(Heading("Judge reliability"))
    reliability = (f"{judge['verdicts']} verdicts, {judge['failures']} failed (failure rate {_fmt(judge['failure_rate'])})"
                   + (f", {judge['inconsistent']} inconsistent between the two orders (rate "
                      f"{_fmt(judge['inconsistency_rate'])}, counted as ties)" if "inconsistency_rate" in judge else "")
                   + (f"; {judge['requests']} requests, {judge['retried']} retried." if judge["kind"] == "llm" else "."))
    blocks.append(Paragraph(reliability))
    if judge["failed_examples"]:
        blocks.append(TableBlock(["item", "why it failed", "judge's text"], [
            [f["key"], f["reason"], f.get("text", "")] for f in judge["failed_examples"]]))
    return blocks


def _source(source: dict) -> str:
    """A model source as a person would name it: the file, the URL, the folder or the function."""
    shown = source.get("function") or source.get("gguf") or source.get("base_url") or source.get("hf") or "?"
    return shown + (f" + {source['adapter']}" if source.get("adapter") else "")


def _data_blocks(fmt: dict | None, split: dict | None) -> list[Block]:
    """The data: where every record went, leakage measured on the split files (with example
    pairs), near-duplicates and benchmark contamination."""
    blocks: list[Block] = [Heading("Data")]
    if fmt:
        a = fmt.get("accounting") or {}
        blocks.append(Paragraph(f"format: {a.get('equation', '')}. Rejected ratio {_fmt(fmt.get('rejected_ratio'))}; "
                                f"files not read to their end: {fmt.get('files_incomplete', 0)}."))
        for item in fmt.get("incomplete_files") or []:
            blocks.append(Paragraph(f"{item['file']}: {item['detail']} (records lost: "
                                    f"{'unknown' if item.get('records_lost') is None else item['records_lost']})."))
    if not split:
        blocks.append(Paragraph("No split metrics (metrics/split.json)."))
        return blocks
    a = split.get("accounting") or {}
    blocks.append(Paragraph(f"split: {a.get('equation', '')}; re-read by the leakage check: {a.get('reread')} "
                            f"(balanced: {_fmt(a.get('balanced'))}). {split.get('groups')} groups, the largest of "
                            f"{split.get('largest_group')} record{'' if split.get('largest_group') == 1 else 's'}."))
    leakage = split.get("leakage") or {}
    blocks.append(TableBlock(["splits", "shared user turns", "near-duplicate user turns"], [
        [pair.replace("_", " / "), (leakage.get(pair) or {}).get("user_turns"), (leakage.get(pair) or {}).get("near_duplicates")]
        for pair in ("train_val", "train_test", "val_test")]))
    if leakage.get("method"):
        blocks.append(Paragraph(f"Measured: {leakage['method']}."))
    examples = leakage.get("examples") or []
    if examples:
        blocks.append(TableBlock(["kind", "jaccard", "first", "second"], [
            [e["kind"].replace("_", " "), e.get("jaccard"),
             f"{e['pair'][0]['split']}:{e['pair'][0]['line']} {e['pair'][0]['text']}",
             f"{e['pair'][1]['split']}:{e['pair'][1]['line']} {e['pair'][1]['text']}"] for e in examples]))
    near = split.get("near_duplicates") or {}
    blocks.append(Paragraph(f"Duplicates dropped: {split.get('duplicates_exact')} exact, {split.get('duplicates_normalized')} "
                            f"normalized, {near.get('dropped')} near (mode {near.get('mode')}, Jaccard >= "
                            f"{near.get('threshold')}); {near.get('pairs')} near-duplicate pairs "
                            f"{'linked records into groups' if near.get('mode') == 'group' else 'found'}; each dropped "
                            f"record is in {(split.get('duplicates_file') or {}).get('path')}."))
    d = split.get("decontamination") or {}
    if d.get("benchmarks"):
        blocks.append(Paragraph(f"Benchmark contamination ({', '.join(b['file'] for b in d['benchmarks'])}): found "
                                f"{_fmt(d.get('found'))}; removed from train {d.get('removed')}, left in train "
                                f"{d.get('remaining_in_train')}."))
        if d.get("examples"):
            blocks.append(TableBlock(["split", "line", "match", "record", "benchmark prompt"], [
                [e["split"], e["line"], e["match"], e["text"], e["benchmark"]["prompt"]] for e in d["examples"]]))
    return blocks


def _required(criterion: dict) -> Any:
    if criterion["required"] is not None and isinstance(criterion["value"], str):
        return f"{_fmt(criterion['required'])} ({criterion['value']})"
    return criterion["required"] if criterion["required"] is not None else criterion["value"]


def _size(value: Any) -> str:
    return f"{value / 2**20:.1f} MiB" if isinstance(value, (int, float)) and not isinstance(value, bool) else _fmt(value)


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):  # per-example records are counted, not spelled out in a cell
        if any(isinstance(v, (dict, list)) for v in value):
            return f"{len(value)} entries"
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return str(value)


# --- figures -----------------------------------------------------------------------------


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # no display; files only
    from matplotlib.figure import Figure as MplFigure

    return MplFigure(figsize=(8, 3.6), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _loss_png(history: list[dict], evals: list[dict]) -> bytes:
    fig = _figure()
    ax = fig.add_subplot()
    points = [h for h in history if h.get("loss") is not None]
    ax.plot([h["step"] for h in points], [h["loss"] for h in points], color="#c2410c", label="training loss")
    evaluated = [e for e in evals if e.get("eval_loss") is not None]
    if evaluated:
        ax.plot([e["step"] for e in evaluated], [e["eval_loss"] for e in evaluated], color="#047857", marker="o",
                markersize=3, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    rates = [h for h in points if h.get("learning_rate") is not None]
    if rates:
        right = ax.twinx()
        right.plot([h["step"] for h in rates], [h["learning_rate"] for h in rates], color="#4338ca", linestyle="--",
                   label="learning rate")
        right.set_ylabel("learning rate")
        lines = ax.get_lines() + right.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], loc="upper center")
    else:
        ax.legend(loc="upper center")
    ax.set_title("Training and validation loss" if evaluated else "Training loss")
    return _png(fig)


def _scores_png(baseline: list[float], finetuned: list[float], metric: str) -> bytes:
    fig = _figure()
    ax = fig.add_subplot()
    values = baseline + finetuned
    bins = [i / 10 for i in range(11)] if all(0 <= v <= 1 for v in values) else 10
    ax.hist([baseline, finetuned], bins=bins, label=["baseline", "fine-tuned"], color=["#9ca3af", "#15803d"])
    ax.set_xlabel(f"{metric} per test example")
    ax.set_ylabel("examples")
    ax.set_title(f"Score distribution ({len(baseline)} examples)")
    ax.legend(loc="upper center")
    return _png(fig)


# --- rendering ---------------------------------------------------------------------------


def _markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for i, block in enumerate(blocks):
        if isinstance(block, Heading):
            lines += [("# " if i == 0 else "## ") + block.text, ""]
        elif isinstance(block, Paragraph):
            lines += [_md_cell(block.text), ""]
        elif isinstance(block, Figure):
            lines += [f"![{block.alt}](report/{block.file})", ""]
        else:
            lines.append("| " + " | ".join(block.columns) + " |")
            lines.append("|" + "---|" * len(block.columns))
            lines += ["| " + " | ".join(_md_cell(_fmt(v)) for v in row) + " |" for row in block.rows]
            lines.append("")
    return "\n".join(lines)


def _md_cell(text: str) -> str:
    # Example text is data, not markup: no HTML tag may start (a `<` before a letter, `/`, `!`
    # or `?`), and no `|` or newline may break the table. `>=` and `< 0.05` stay readable.
    return TAG_START.sub("&lt;", text.replace("&", "&amp;")).replace("|", "\\|").replace("\n", "<br>")


def _html(blocks: list[Block]) -> str:
    body: list[str] = []
    for i, block in enumerate(blocks):
        if isinstance(block, Heading):
            tag = "h1" if i == 0 else "h2"
            body.append(f"<{tag}>{html.escape(block.text)}</{tag}>")
        elif isinstance(block, Paragraph):
            body.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, Figure):
            data = base64.b64encode(block.png).decode("ascii")
            body.append(f'<img src="data:image/png;base64,{data}" alt="{html.escape(block.alt)}">')
        else:
            head = "".join(f"<th>{html.escape(c)}</th>" for c in block.columns)
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in block.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>factory report</title>
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; max-width: 1000px; margin: 24px auto; padding: 0 16px; color: #1d2430; }}
table {{ border-collapse: collapse; width: 100%; margin: 8px 0 16px; font-variant-numeric: tabular-nums; }}
th, td {{ text-align: left; padding: 4px 8px; border-bottom: 1px solid #d8dde5; vertical-align: top; white-space: pre-wrap; }}
th {{ color: #6b7280; font-size: 13px; }}
img {{ max-width: 100%; }}
</style></head>
<body>
{chr(10).join(body)}
</body></html>
"""
