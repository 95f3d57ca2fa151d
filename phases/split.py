"""split: placeholder until the phase module is written."""

from factory.phase import Phase

PHASE = Phase(name="split", summary="split", metrics="split", run=None, unavailable_reason="not written yet")
