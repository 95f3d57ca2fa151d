"""evaluate: score the fine-tuned model (base + adapter) and prove whether it beats the base.

Same test split, same decoding and scorers as the baseline phase, so the comparison is
paired example by example (seed 002): improvement (absolute and relative), the paired test
(McNemar's exact test for 0/1 metrics such as exact match, the paired t-test otherwise),
Wilcoxon signed-rank, a bootstrap 95% interval, and the examples that flipped either way.
An optional second test set (e.g. safety) is checked for regressions. The model-performance
gate reads `comparison` and `regression` from metrics/evaluation.json.
"""

from __future__ import annotations

from typing import Any

import orjson

from factory import modeling
from factory.errors import InputError
from factory.phase import MODEL_LIBRARIES, Phase, PhaseContext

FLIPPED_SHOWN = 20  # examples listed per direction


def run(ctx: PhaseContext) -> dict[str, Any]:
    from factory import evaluation, scoring

    cfg, ws = ctx.config, ctx.workspace
    baseline = _read_baseline(ctx)
    test_file = ws.split_file("test")
    identity = evaluation.split_identity(ws, test_file)
    if baseline["test_split"].get("xxh3_128") != identity["xxh3_128"]:
        raise InputError("the test split changed since the baseline was scored; run `factory run baseline --force`")
    if baseline["decoding"] != evaluation.decoding(cfg):
        raise InputError("the evaluation settings changed since the baseline was scored; run `factory run baseline --force`")
    adapter = ws.path(cfg.save.lora_path)
    if not (adapter / "adapter_config.json").exists():
        raise InputError(f"{ws.rel(adapter)} has no adapter; run `factory run finetune` first")

    records = evaluation.read_split(test_file, ws, cfg.evaluation.max_examples)
    if baseline["num_examples"] != len(records):
        raise InputError(f"the baseline scored {baseline['num_examples']} test examples, evaluate selects {len(records)} "
                         "(evaluation.max_examples changed?); run `factory run baseline --force`")
    backend = modeling.select_backend(cfg.model.backend)
    ctx.log.info("scoring base + adapter %s on %d test examples", ws.rel(adapter), len(records))
    model, chat = modeling.load_for_inference(cfg, ws, backend, adapter=adapter)
    result = evaluation.score_model(ctx, model, chat, records, what="fine-tuned")

    primary = result["primary"]  # the configured metric; for plain text, the language-modelling one
    if baseline["primary"] != primary:
        raise InputError("the evaluation settings changed since the baseline was scored; run `factory run baseline --force`")
    base_scores = [e["scores"][primary] for e in baseline["examples"]]
    tuned_scores = [e["scores"][primary] for e in result["examples"]]
    comparison = {"metric": primary, **scoring.compare(base_scores, tuned_scores, bootstrap=cfg.evaluation.bootstrap_samples,
                                                        seed=cfg.evaluation.seed)}
    per_metric = {
        name: {"baseline": baseline["scores"][name], "finetuned": result["scores"][name],
               "improvement": evaluation.difference(result["scores"][name], baseline["scores"][name])}
        for name in result["scores"] if name in baseline["scores"]
    }
    flipped = scoring.flips(base_scores, tuned_scores)
    examples = {
        direction: [_flip_entry(baseline["examples"][i], result["examples"][i], primary) for i in indices[:FLIPPED_SHOWN]]
        for direction, indices in flipped.items()
    }

    output: dict[str, Any] = {
        "model": cfg.model.name,
        "adapter": ws.rel(adapter),
        "device": backend.device,
        "test_split": identity,
        "comparison": comparison,
        "per_metric": per_metric,
        "flipped": {"improved": len(flipped["improved"]), "regressed": len(flipped["regressed"]), "examples": examples},
        **result,
    }
    if cfg.evaluation.second_test_set:
        second_file = ws.path(cfg.evaluation.second_test_set)
        second = evaluation.score_model(ctx, model, chat, evaluation.read_split(second_file, ws), what="second set")
        base_second = baseline.get("second_test_set")
        if base_second is None:
            raise InputError("evaluation.second_test_set is set but the baseline did not score it; run `factory run baseline --force`")
        drops = {name: base_second["scores"][name] - second["scores"][name] for name in second["scores"]}
        output["regression"] = {"file": ws.rel(second_file), "baseline": base_second["scores"],
                                "finetuned": second["scores"], "drops": drops, "max_drop": max(drops.values())}
    return output


PHASE = Phase(
    name="evaluate",
    summary="Evaluate the fine-tuned model and compare with the baseline",
    metrics="evaluation",
    run=run,
    config_sections=("model", "evaluation", "save.lora_path"),
    inputs=lambda cfg, ws: [ws.split_file("test"), ws.metrics_file("baseline"), ws.path(cfg.save.lora_path),
                            *modeling.local_model_inputs(cfg, ws), *modeling.second_test_set(cfg, ws)],
    libraries=MODEL_LIBRARIES,
)


def _read_baseline(ctx: PhaseContext) -> dict:
    path = ctx.workspace.metrics_file("baseline")
    if not path.exists():
        raise InputError(f"{ctx.workspace.rel(path)} not found; run `factory run baseline` first")
    return orjson.loads(path.read_bytes())


def _flip_entry(base: dict, tuned: dict, metric: str) -> dict:
    return {"index": base["index"], "prompt": base["prompt"], "reference": base["reference"],
            "baseline": base["prediction"], "finetuned": tuned["prediction"],
            "baseline_score": base["scores"][metric], "finetuned_score": tuned["scores"][metric]}
