"""Multirun sweeps: a real 2×2 `train.py -m` writes a 4-row summary and override-named
TensorBoard runs; the summary table on hand-made job folders; the optuna search (if installed)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moelab.run.names import parse_override
from moelab.sweeps.jobs import collect_jobs
from moelab.sweeps.summary import write_summary

from ..conftest import ROOT

TINY = (
    "debug=default", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1", "data.batch_size=16", "callbacks.progress=null",
)


def train_multirun(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def test_2x2_multirun_writes_a_summary_with_4_rows_and_named_tensorboard_runs(tmp_path):
    sweep = tmp_path / "sweep"
    result = train_multirun("-m", "router=topk,switch", "experts=4,8", *TINY, f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]

    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert [(r["job"], r["router"], r["experts"]) for r in rows] == [
        ("0", "topk", "4"), ("1", "topk", "8"), ("2", "switch", "4"), ("3", "switch", "8"),
    ]
    for row in rows:
        assert 0.0 <= float(row["val/acc"]) <= 1.0 and float(row["test/loss"]) > 0
    markdown = (sweep / "summary.md").read_text()
    assert "| job | router | experts | status | val/acc |" in markdown and "Shared overrides: `debug=default`" in markdown
    assert "| 3 | switch | 8 | ok |" in result.stdout  # the table is printed too
    assert {row["status"] for row in rows} == {"ok"}

    for job in range(4):
        (run_dir,) = (sweep / str(job) / "tensorboard").iterdir()
        overrides = yaml.safe_load((sweep / str(job) / ".hydra" / "overrides.yaml").read_text())
        # Named by what sets the job apart: the overrides every job shares (debug=default, ...) left out.
        assert run_dir.name == ",".join(sorted(o for o in overrides if o.startswith(("router=", "experts=")))), run_dir.name
        assert any(p.name.startswith("events.out.tfevents") for p in run_dir.iterdir())


def test_a_failing_job_is_recorded_the_sweep_goes_on_and_exits_1(tmp_path):
    sweep = tmp_path / "sweep"
    result = train_multirun("-m", "experts=0,4", *TINY, "trainer.limit_train_batches=4", "++trainer.max_steps=2", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"moelab: error: 1 of 2 jobs did not end ok: 0 (error); see {sweep}/summary.md"
    )
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["experts"], r["status"]) for r in rows] == [("0", "error"), ("4", "ok")]
    assert rows[0]["reason"] == "experts=0: a MoE layer needs at least 1 expert, set experts>=1"
    assert not rows[1].get("val/acc") and rows[1]["train/loss"]  # too short to validate: no value, still ok
    assert "| 0 | error: experts=0: a MoE layer needs at least 1 expert" in (sweep / "summary.md").read_text()


def _fake_job(sweep: Path, num: int, overrides: list[str], metrics: dict | None) -> None:
    (sweep / str(num) / ".hydra").mkdir(parents=True)
    (sweep / str(num) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (sweep / str(num) / "metrics.json").write_text(json.dumps(metrics))


def test_summary_orders_jobs_numerically_and_marks_missing_metrics(tmp_path):
    _fake_job(tmp_path, 10, ["experts=16", "+extra=1"], {"val/acc": 0.5, "train/loss": 1.0})
    _fake_job(tmp_path, 2, ["experts=8"], None)  # a job that failed before writing metrics
    markdown, _ = write_summary(tmp_path)
    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.reader(f))
    no_metrics = "no metrics.json: the job did not finish (see its log)"
    assert rows == [
        ["job", "experts", "extra", "status", "val/acc", "train/loss", "reason"],
        ["2", "8", "", "error", "", "", no_metrics],
        ["10", "16", "1", "ok", "0.5", "1.0", ""],
    ]
    # The Markdown shows what a sweep compares (val/, test/); train/loss stays in the CSV.
    assert f"| 2 | 8 |  | error: {no_metrics} | — |" in markdown and "train/loss" not in markdown
    assert [job["job"] for job in collect_jobs(tmp_path)] == ["2", "10"]


def test_parse_override():
    assert parse_override("router=topk") == ("router", "topk")
    assert parse_override("++model.moe_layers=[0,3]") == ("model.moe_layers", "[0,3]")
    assert parse_override("~callbacks.progress") == ("callbacks.progress", "(deleted)")


def test_optuna_study_survives_failed_trials_and_ends_in_one_line_when_none_completed(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="needs the `sweep` extra")
    sweep = tmp_path / "optuna"
    result = train_multirun("hparams_search=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2",
                            "++hydra.sweeper.params={experts:'choice(0,1)',router.k:'choice(2)'}", *TINY, f"hydra.sweep.dir={sweep}")
    # experts=0 is a config error, experts=1 with k=2 too: both trials fail, the study does not crash.
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("moelab: error: no Optuna trial completed")
    with open(sweep / "summary.csv") as f:
        assert {row["status"] for row in csv.DictReader(f)} == {"error"}


def test_optuna_search_runs_trials_and_summarises(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="needs the `sweep` extra")
    sweep = tmp_path / "optuna"
    result = train_multirun("hparams_search=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2", *TINY, f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert 0.0 <= best["best_value"] <= 1.0
    with open(sweep / "summary.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
