"""format: placeholder until the phase module is written."""

from factory.phase import Phase

PHASE = Phase(name="format", summary="format", metrics="format", run=None, unavailable_reason="not written yet")
