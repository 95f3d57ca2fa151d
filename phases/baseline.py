"""baseline: evaluate the base model on the test split (not implemented yet)."""

from factory.phase import Phase

PHASE = Phase(
    name="baseline",
    summary="Evaluate the base model on the test split",
    metrics="baseline",
    run=None,
    unavailable_reason="the baseline phase is not available yet (model phases are planned in the next release)",
)
