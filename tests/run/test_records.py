"""metrics.json: strict JSON, non-finite values as null, a status on every record."""

from __future__ import annotations

import json

import pytest

from moelab.run.records import read_record, write_record


def test_non_finite_metrics_are_written_as_null_in_strict_json(tmp_path):
    path = tmp_path / "metrics.json"
    write_record(path, {"val/loss": float("nan"), "train/loss": float("inf"), "val/acc": 0.5}, "diverged", "why", 7)

    def refuse(constant):
        raise ValueError(constant)

    raw = json.loads(path.read_text(), parse_constant=refuse)
    assert raw == {"val/loss": None, "train/loss": None, "val/acc": 0.5, "status": "diverged", "reason": "why", "step": 7}
    assert read_record(path) == {"metrics": {"val/loss": None, "train/loss": None, "val/acc": 0.5},
                                 "status": "diverged", "reason": "why", "step": 7}


def test_unknown_status_is_refused_and_missing_records_read_as_errors(tmp_path):
    with pytest.raises(ValueError, match="status 'done'"):
        write_record(tmp_path / "m.json", {}, "done")
    missing = read_record(tmp_path / "nothing.json")
    assert missing["status"] == "error" and "did not finish" in missing["reason"]
    (tmp_path / "old.json").write_text('{"val/acc": 0.9}')  # written before statuses existed
    assert read_record(tmp_path / "old.json")["status"] == "ok"
