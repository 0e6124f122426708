"""A run's record: `metrics.json` (strict JSON: final metrics, `status`, `reason`, `step`). Light
on purpose (no torch): the sweep summary imports it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

METRICS_FILE = "metrics.json"

OK, DIVERGED, INTERRUPTED, ERROR = "ok", "diverged", "interrupted", "error"
STATUSES = (OK, DIVERGED, INTERRUPTED, ERROR)
# metrics.json keys that are not metrics.
RECORD_KEYS = ("status", "reason", "step")


def finite_or_none(value: Any) -> float | None:
    """A metric as strict JSON allows it: a float, or None for NaN and ±inf."""
    number = float(value)
    return number if math.isfinite(number) else None


def write_record(
    path: str | Path, metrics: Mapping[str, Any], status: str = OK, reason: str | None = None, step: int | None = None
) -> dict[str, Any]:
    """Write `metrics.json`: every metric by its logged name (non-finite values as null), and
    `status` (ok, diverged, interrupted, error), `reason` (one line, when not ok), `step`
    (the last optimizer step). Returns what was written."""
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {STATUSES}")
    record: dict[str, Any] = {name: finite_or_none(value) for name, value in metrics.items()}
    record["status"] = status
    if reason:
        record["reason"] = reason
    if step is not None:
        record["step"] = int(step)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, allow_nan=False) + "\n")
    tmp.replace(path)
    return record


def read_record(path: str | Path) -> dict[str, Any]:
    """{"metrics": {name: float | None}, "status", "reason", "step"} of a metrics.json; a
    missing or unreadable file reads as status "error" with the reason why."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {"metrics": {}, "status": ERROR, "reason": f"no {path.name}: the job did not finish (see its log)", "step": None}
    except (OSError, ValueError) as exc:
        return {"metrics": {}, "status": ERROR, "reason": f"{path.name} is unreadable: {exc}", "step": None}
    metrics = {k: (None if v is None else float(v)) for k, v in raw.items() if k not in RECORD_KEYS}
    return {
        "metrics": metrics,
        "status": raw.get("status", OK),  # files written before statuses existed were finished runs
        "reason": raw.get("reason"),
        "step": raw.get("step"),
    }
