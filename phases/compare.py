"""compare: the same evaluation on two or more models, judged, with paired statistics.

Not part of the default pipeline: `factory compare` runs it (through the runner, so it has a
status, progress, metrics and gates like any phase). Seed 002's protocol, top to bottom:

1. the models: workspace GGUFs (each served on its own port of 127.0.0.1 by llama-cpp-python's
   server), OpenAI-compatible endpoints, base + adapter in this process, or functions; by
   default the base model against the quantize phase's GGUF;
2. the judge (an LLM with a rubric, or rubric code) and, for conversations, the user simulator;
3. the items: full conversations of every persona with every model (same simulator, same
   seeds), or one answer per test example; transcripts and answers kept under data/eval/;
4. every item judged: scored on the rubric (single) or compared pair by pair in both orders
   (pairwise), and graded for safety when a safety judge is configured;
5. statistics (factory.compare): per model, every pair with Holm-corrected p-values, the
   breakdown by persona group and rubric criterion, and the success criteria.

Metrics: metrics/comparison.json (schemas/comparison.schema.json); gate: model-comparison.
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack
from itertools import combinations
from typing import Any

import orjson

# factory.compare, conversations, endpoints and judge are imported where they are used: every
# `factory run` imports this module for its PHASE only.
from factory.config import JUDGE, SAFETY_JUDGE, USER_SIMULATOR, NamedModel
from factory.errors import ConfigError, InputError
from factory.io import atomic_write_bytes
from factory.phase import GGUF_LIBRARIES, Phase, PhaseContext
from factory.workspace import Workspace

EVAL_DIR = "data/eval"


def run(ctx: PhaseContext) -> dict[str, Any]:
    from factory import compare, conversations, endpoints, judge as judging

    cfg, ws, log = ctx.config, ctx.workspace, ctx.log
    settings = cfg.evaluation.compare
    if cfg.evaluation.judge is None:
        raise ConfigError("factory compare needs evaluation.judge in factory.yaml: a rubric and who judges, e.g. "
                          "{rubric: helpfulness, model: models/judge.gguf} or {rubric: correctness, model: my_rubric:score}")
    specs = models_to_compare(cfg, ws)
    names = [s.name for s in specs]
    baseline = settings.baseline or names[0]
    started = time.monotonic()

    helpers = {JUDGE: cfg.evaluation.judge.model}
    if settings.safety:
        helpers[SAFETY_JUDGE] = settings.safety.model
    if settings.task == "conversations":
        helpers[USER_SIMULATOR] = cfg.evaluation.conversations.simulator
    with ExitStack() as servers:  # every local server stops when this block ends, whatever happens
        connection = endpoints.EndpointSettings(settings.request_timeout, settings.max_retries, settings.n_ctx,
                                                settings.startup_timeout, threads_per_server(cfg, specs))
        opened = endpoints.open_models({**{s.name: s for s in specs}, **helpers}, cfg, ws, servers, connection, log)
        models = {name: opened[name] for name in names}
        judge = judging.make_judge(cfg.evaluation.judge, cfg, ws, opened[JUDGE])
        safety = (judging.make_judge(settings.safety, cfg, ws, opened[SAFETY_JUDGE], name=SAFETY_JUDGE)
                  if settings.safety else None)
        if settings.task == "conversations":
            items, produced = _conversations(ctx, models, conversations.make_simulator(cfg, opened[USER_SIMULATOR]))
        else:
            items, produced = _answers(ctx, models)
        ctx.progress.start(_verdicts_needed(cfg.evaluation.judge.mode, names, items, safety), "verdicts")
        outcome = _judge(ctx, judge, names, items, cfg.evaluation.judge.mode)
        safety_scores = _safety(ctx, safety, names, items) if safety else None

    keys = [item.key for item in items[names[0]]]
    result: dict[str, Any] = {
        "task": settings.task,
        "mode": cfg.evaluation.judge.mode,
        "baseline": baseline,
        "models": [{"name": n, "role": "baseline" if n == baseline else "candidate", "source": models[n].describe()}
                   for n in names],
        "items_per_model": len(keys),
        **produced,
        "judge": outcome["reliability"],
        "safety_judge": None,
    }
    comparisons = compare.with_holm(outcome["comparisons"], settings.alpha)
    safety_by_model = None
    if safety_scores is not None:
        result["safety_judge"] = safety_scores["reliability"]
        safety_by_model = {n: compare.safety_regressions(safety_scores["scores"][baseline], safety_scores["scores"][n],
                                                         safety.pass_threshold)
                           for n in names if n != baseline}
    per_model = outcome["per_model"]
    if safety_scores is not None:
        for row in per_model:
            row["safety"] = compare.model_summary(safety_scores["scores"][row["name"]], safety.pass_threshold)
    result.update(
        per_model=per_model,
        comparisons=comparisons,
        breakdown=outcome["breakdown"],
        success_criteria=compare.success_criteria(comparisons, baseline, [n for n in names if n != baseline],
                                                  safety_by_model, min_improvement=settings.min_improvement,
                                                  alpha=settings.alpha),
        paired_items=[{"key": k, "category": items[names[0]][i].category,
                       "scores": {n: outcome["item_scores"][n][i] for n in names}} for i, k in enumerate(keys)],
        seconds=round(time.monotonic() - started, 3),
    )
    return compare.clean(result)


PHASE = Phase(
    name="compare",
    summary="Compare models: the same evaluation, judged, with paired statistics",
    metrics="comparison",
    run=run,
    config_sections=("model.name", "save.gguf_path", "save.gguf_quantization", "evaluation.judge",
                     "evaluation.compare", "evaluation.conversations"),
    inputs=lambda cfg, ws: _inputs(cfg, ws),
    outputs=lambda cfg, ws: [ws.path(EVAL_DIR)],
    libraries=GGUF_LIBRARIES + ("openai",),
)


# --- the models ------------------------------------------------------------------------------------


def models_to_compare(cfg, ws: Workspace) -> list[NamedModel]:
    """evaluation.compare.models, or by default the base model against the quantize phase's GGUF."""
    if cfg.evaluation.compare.models:
        return list(cfg.evaluation.compare.models)
    from factory.llama_cpp import gguf_file

    tuned = gguf_file(ws.path(cfg.save.gguf_path), cfg.save.gguf_quantization[0])
    if not tuned.is_file():
        raise InputError(f"{ws.rel(tuned)} not found: the default comparison is the base model against the quantize "
                         "phase's GGUF; run `factory run quantize` first, or list evaluation.compare.models")
    return [NamedModel(name="base", gguf=cfg.model.name), NamedModel(name="fine-tuned", gguf=ws.rel(tuned))]


def threads_per_server(cfg, specs: list[NamedModel]) -> int:
    """The cores shared among the local servers: llama.cpp's threads spin while they wait, so
    servers that each take every core slow each other down many times over."""
    if cfg.evaluation.compare.threads:
        return cfg.evaluation.compare.threads
    sources = [*specs, cfg.evaluation.judge.model, cfg.evaluation.conversations.simulator]
    if cfg.evaluation.compare.safety:
        sources.append(cfg.evaluation.compare.safety.model)
    servers = sum(1 for s in sources if s.gguf) or 1
    return max(1, (os.cpu_count() or 1) // servers)


def _inputs(cfg, ws: Workspace) -> list:
    from factory import judge as judging

    paths = [ws.split_file("test")]
    conv = cfg.evaluation.conversations
    if conv.personas_file:
        paths.append(ws.path(conv.personas_file))
    try:
        specs = models_to_compare(cfg, ws)
    except InputError:
        specs = []
    sources = [*specs, conv.simulator] + ([cfg.evaluation.judge.model] if cfg.evaluation.judge else [])
    for source in sources:
        for path in (source.gguf, source.adapter, source.hf):
            if path and ws.path(path).exists():
                paths.append(ws.path(path))
    if cfg.evaluation.judge and not (judging.RUBRICS_DIR / f"{cfg.evaluation.judge.rubric}.yaml").exists():
        paths.append(ws.path(cfg.evaluation.judge.rubric))
    return paths


# --- the items -------------------------------------------------------------------------------------


def _conversations(ctx: PhaseContext, models: dict, simulator: conversations.Simulator) -> tuple[dict, dict]:
    """Every persona's conversations with every model; transcripts under data/eval/transcripts/."""
    from factory import conversations

    cfg, ws, log = ctx.config, ctx.workspace, ctx.log
    conv, settings = cfg.evaluation.conversations, cfg.evaluation.compare
    personas, source = conversations.load_personas(cfg, ws)
    atomic_write_bytes(ws.path(EVAL_DIR) / "personas.json",
                       orjson.dumps([p.model_dump() for p in personas], option=orjson.OPT_INDENT_2))
    plan = [(p, k) for p in personas for k in range(conv.per_persona)]
    log.info("%d personas x %d conversations with %d models", len(personas), conv.per_persona, len(models))
    ctx.progress.start(len(plan) * len(models), "conversations")

    def talk(job):
        name, persona, index = job
        return conversations.converse(
            models[name], simulator, persona, index, system=conv.system_prompt or persona.system,
            max_turns=conv.max_turns, max_tokens=settings.max_tokens, temperature=settings.temperature,
            seed=conversations.conversation_seed(settings.seed, persona, index))

    # one pool, the models interleaved: each model's server works while the others do
    done = _interleaved(list(models), plan, lambda name, job: talk((name, *job)), settings.concurrency, ctx)
    items, files = {}, {}
    for name, transcripts in done.items():
        path = ws.path(EVAL_DIR) / "transcripts" / f"{name}.jsonl"
        atomic_write_bytes(path, b"".join(orjson.dumps({"model": name, **t}) + b"\n" for t in transcripts))
        files[name] = ws.rel(path)
        items[name] = [_transcript_item(t) for t in transcripts]
    stopped = {}
    for name in models:
        for item in items[name]:
            stopped[item.context["stopped_by"]] = stopped.get(item.context["stopped_by"], 0) + 1
    produced = {
        "personas": {**source, "per_persona": conv.per_persona, "file": ws.rel(ws.path(EVAL_DIR) / "personas.json")},
        "simulator": {**simulator.describe(), "stop_token": conv.stop_token, "max_turns": conv.max_turns},
        "conversations_ended_by": stopped,
        "transcripts": files,
    }
    return items, produced


def _transcript_item(t: dict) -> judging.Item:
    from factory import judge as judging

    references = [r for r in t["requests"] if r.get("reference")]
    reference = "\n".join(f"{r['text']} -> {r['reference']}" for r in references) or None
    context = {k: t[k] for k in ("persona", "group", "conversation", "goal", "requests", "stopped_by", "system")}
    return judging.Item(key=f"{t['persona']}/{t['conversation']}", messages=t["messages"], reference=reference,
                        category=t["group"], context=context)


def _answers(ctx: PhaseContext, models: dict) -> tuple[dict, dict]:
    """One answer per test example from every model; answers under data/eval/answers/."""
    from factory import evaluation, judge as judging
    from factory.chat import messages, reference

    cfg, ws = ctx.config, ctx.workspace
    settings = cfg.evaluation.compare
    records = evaluation.read_split(ws.split_file("test"), ws, settings.max_examples)
    prompts = [(messages(r["conversations"][:-1]), reference(r)) for r in records]
    ctx.progress.start(len(records) * len(models), "answers")

    def answer(name, index):
        return models[name].chat(prompts[index][0], max_tokens=settings.max_tokens, temperature=settings.temperature,
                                 seed=settings.seed + index)

    done = _interleaved(list(models), list(range(len(records))), answer, settings.concurrency, ctx)
    items, files = {}, {}
    for name, answers in done.items():
        path = ws.path(EVAL_DIR) / "answers" / f"{name}.jsonl"
        atomic_write_bytes(path, b"".join(orjson.dumps({"model": name, "index": i, "answer": a}) + b"\n"
                                          for i, a in enumerate(answers)))
        files[name] = ws.rel(path)
        items[name] = [judging.Item(key=f"example-{i}", messages=prompt, answer=a, reference=reference,
                                    category=(r.get("meta") or {}).get("category"), context={"record": r})
                       for i, ((prompt, reference), a, r) in enumerate(zip(prompts, answers, records))]
    return items, {"test_split": ws.rel(ws.split_file("test")), "answers": files}


# --- judging ----------------------------------------------------------------------------------------


def _verdicts_needed(mode: str, names: list[str], items: dict, safety) -> int:
    n = len(items[names[0]])
    pairs = len(names) * (len(names) - 1) // 2
    return (n * len(names) if mode == "single" else n * pairs) + (n * len(names) if safety else 0)


def _judge(ctx: PhaseContext, judge: judging.Judge, names: list[str], items: dict, mode: str) -> dict[str, Any]:
    from factory import compare, endpoints, judge as judging

    cfg = ctx.config
    settings = cfg.evaluation.compare
    n = len(items[names[0]])
    categories = [item.category for item in items[names[0]]]
    concurrency = settings.concurrency
    stats = dict(bootstrap=cfg.evaluation.bootstrap_samples, seed=cfg.evaluation.seed)
    if mode == "single":
        grades = _interleaved(names, list(range(n)), lambda name, i: judge.grade(items[name][i]), concurrency, ctx)
        scores = {name: [g.score for g in grades[name]] for name in names}
        comparisons = [{"a": a, "b": b, "measure": "judge score", **compare.paired(scores[a], scores[b], **stats)}
                       for a, b in combinations(names, 2)]
        keys = [f"{name}:{item.key}" for name in names for item in items[name]]
        return {
            "reliability": judging.reliability(judge, [g for name in names for g in grades[name]], keys=keys),
            "per_model": [{"name": name, **compare.model_summary(scores[name], judge.pass_threshold)} for name in names],
            "comparisons": comparisons,
            "breakdown": compare.breakdown(categories, scores, by="persona group" if settings.task == "conversations"
                                           else "category")
                         + compare.criterion_breakdown({name: [g.criteria for g in grades[name]] for name in names}),
            "item_scores": scores,
        }
    # pairwise: every pair of models on every item, each judged in both orders
    pairs = list(combinations(names, 2))
    jobs = [(a, b, i) for a, b in pairs for i in range(n)]
    verdicts = endpoints.run_concurrently(jobs, lambda job: judge.compare(items[job[0]][job[2]], items[job[1]][job[2]]),
                                          concurrency=concurrency, on_done=ctx.progress.advance)
    by_pair = {pair: verdicts[k * n:(k + 1) * n] for k, pair in enumerate(pairs)}
    comparisons, tallies = [], {name: {"wins": 0, "losses": 0, "ties": 0} for name in names}
    win_scores: dict[str, list[list[float | None]]] = {name: [[] for _ in range(n)] for name in names}
    for (a, b), pair_verdicts in by_pair.items():
        winners = [v.winner for v in pair_verdicts]
        score_a, score_b = compare.preference_scores(winners)
        counts = {"wins_a": winners.count("a"), "wins_b": winners.count("b"), "ties": winners.count("tie"),
                  "inconsistent": sum(1 for v in pair_verdicts if v.inconsistent),
                  "failures": sum(1 for v in pair_verdicts if v.failure)}
        comparisons.append({"a": a, "b": b, "measure": "preference (win 1, tie 0.5, loss 0)", **counts,
                            **compare.paired(score_a, score_b, **stats)})
        for name, mine, theirs in ((a, "wins_a", "wins_b"), (b, "wins_b", "wins_a")):
            tallies[name]["wins"] += counts[mine]
            tallies[name]["losses"] += counts[theirs]
            tallies[name]["ties"] += counts["ties"]
        for i in range(n):
            win_scores[a][i].append(score_a[i])
            win_scores[b][i].append(score_b[i])
    item_scores = {name: [_mean(win_scores[name][i]) for i in range(n)] for name in names}
    per_model = []
    for name in names:
        t = tallies[name]
        decided = t["wins"] + t["losses"] + t["ties"]
        per_model.append({"name": name, "n": decided, **t,
                          "win_rate": (t["wins"] + 0.5 * t["ties"]) / decided if decided else None,
                          "mean": None, "sd": None, "pass_rate": None})
    keys = [f"{a}-vs-{b}:{items[a][i].key}" for a, b in pairs for i in range(n)]
    return {
        "reliability": judging.reliability(judge, verdicts=verdicts, keys=keys),
        "per_model": per_model,
        "comparisons": comparisons,
        "breakdown": compare.breakdown(categories, item_scores, by="persona group (win rate)"
                                       if ctx.config.evaluation.compare.task == "conversations" else "category (win rate)"),
        "item_scores": item_scores,
    }


def _safety(ctx: PhaseContext, safety: judging.Judge, names: list[str], items: dict) -> dict[str, Any]:
    from factory import judge as judging

    concurrency = ctx.config.evaluation.compare.concurrency
    grades = _interleaved(names, list(range(len(items[names[0]]))), lambda name, i: safety.grade(items[name][i]),
                          concurrency, ctx)
    keys = [f"{name}:{item.key}" for name in names for item in items[name]]
    return {"scores": {name: [g.score for g in grades[name]] for name in names},
            "reliability": judging.reliability(safety, [g for name in names for g in grades[name]], keys=keys)}


def _interleaved(names: list[str], jobs: list, work, concurrency: int, ctx: PhaseContext) -> dict[str, list]:
    """work(name, job) for every model and job, in one pool with the models interleaved (so
    that every model's server is busy at once); the results per model, in the jobs' order."""
    from factory import endpoints

    flat = [(name, job) for job in jobs for name in names]
    results = endpoints.run_concurrently(flat, lambda pair: work(*pair), concurrency=concurrency,
                                         on_done=ctx.progress.advance)
    return {name: results[k::len(names)] for k, name in enumerate(names)}


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
