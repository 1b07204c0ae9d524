"""Where a cold start went: the supervisor's timeline and the moment the gateway got ready.

The supervisor appends ``event=<epoch seconds>`` lines to GATEWAY_STARTUP_FILE as it goes
(``boot``, ``download_start``, ``download_end``, ``load_start``); the gateway adds the
moment every backend first answered ready. Three phases come out of it: ``download``
(fetching MODEL_REPO), ``load`` (llama-server started until ready) and ``ready`` (container
boot until ready). Pure functions over the file's text, so they are tested on strings.
"""

from __future__ import annotations

from collections.abc import Mapping

PHASES = ("download", "load", "ready")
EVENTS = ("boot", "download_start", "download_end", "load_start")


def parse(text: str) -> dict[str, float]:
    """The events in the file; unknown names and malformed lines are skipped, the last wins."""
    events: dict[str, float] = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if not sep or name.strip() not in EVENTS:
            continue
        try:
            events[name.strip()] = float(value.strip().replace(",", "."))
        except ValueError:
            continue
    return events


def _span(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return round(max(0.0, end - start), 1)


def timeline(events: Mapping[str, float], ready_at: float | None, now: float) -> dict[str, object]:
    """The current phase and each phase's seconds (the running one counts up to now)."""
    download_end = events.get("download_end")
    if "download_start" in events and download_end is None and "load_start" not in events:
        download_end = now  # still downloading
    if ready_at is not None:
        phase = "ready"
    elif "load_start" in events:
        phase = "loading"
    elif "download_start" in events and "download_end" not in events:
        phase = "downloading"
    else:
        phase = "starting"
    return {
        "phase": phase,
        "download_seconds": _span(events.get("download_start"), download_end),
        "load_seconds": _span(events.get("load_start"), ready_at if ready_at is not None else now),
        "ready_seconds": _span(events.get("boot"), ready_at),
    }


def finished(events: Mapping[str, float], ready_at: float | None) -> dict[str, float]:
    """The phases that are over, for ``gateway_startup_seconds{phase}``."""
    spans = {
        "download": _span(events.get("download_start"), events.get("download_end")),
        "load": _span(events.get("load_start"), ready_at),
        "ready": _span(events.get("boot"), ready_at),
    }
    return {phase: value for phase, value in spans.items() if value is not None}
