"""evaluate: score the fine-tuned model against the baseline (not implemented yet)."""

from factory.phase import Phase

PHASE = Phase(
    name="evaluate",
    summary="Evaluate the fine-tuned model and compare with the baseline",
    metrics="evaluation",
    run=None,
    unavailable_reason="the evaluate phase is not available yet (model phases are planned in the next release)",
)
