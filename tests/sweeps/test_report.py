"""Sweep reports on a tiny real multirun (2 seeds × 2 expert counts): seed grouping, mean ±
std against numbers computed here, valid PNG figures, missing metrics shown as missing."""

from __future__ import annotations

import json
import statistics

import pytest
from matplotlib.image import imread

from moelab.sweeps.report import main, write_report

from ..sweeps.test_summary import TINY, train_multirun

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    sweep = tmp_path_factory.mktemp("report") / "sweep"
    result = train_multirun("-m", "seed=0,1", "experts=4,8", *TINY, "trainer.log_every_n_steps=1",
                            f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep


def job_metrics(sweep, job):
    return json.loads((sweep / str(job) / "metrics.json").read_text())


def table_header(report: str) -> list[str]:
    (line,) = [line for line in report.splitlines() if line.startswith("| experts |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def table_row(report: str, experts: str) -> list[str]:
    (line,) = [line for line in report.splitlines() if line.startswith(f"| {experts} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_the_multirun_writes_a_report_grouped_over_seeds(sweep):
    report = (sweep / "report.md").read_text()  # written by SweepSummary at the end of the multirun
    assert "4 jobs in 2 groups" in report and "Shared overrides: `debug=default`" in report
    assert table_header(report)[:2] == ["experts", "seeds"]  # only what differs between groups
    header = table_header(report)
    column = header.index("val/acc")
    # Jobs: 0 = (seed 0, experts 4), 1 = (0, 8), 2 = (1, 4), 3 = (1, 8).
    for experts, jobs in (("4", (0, 2)), ("8", (1, 3))):
        row = table_row(report, experts)
        assert row[header.index("seeds")] == "0, 1"
        values = [job_metrics(sweep, job)["val/acc"] for job in jobs]
        mean, std = statistics.fmean(values), statistics.stdev(values)
        half = 12.706204736174698 * std / 2**0.5  # t(0.975, df=1) · s / sqrt(n)
        assert row[column] == f"{mean:.4g} ± {std:.2g} [{mean - half:.4g}, {mean + half:.4g}] (n=2)"


def test_figures_are_valid_pngs_for_curves_and_every_layer(sweep):
    report = (sweep / "report.md").read_text()
    figures = sorted((sweep / "report").glob("*.png"))
    names = {p.name for p in figures}
    assert {"curve_train_loss.png", "routing_load_max_over_mean.png", "routing_router_entropy.png"} <= names
    # Each job validates once (one epoch): a single point is not a curve, so none is drawn.
    assert "curve_val_acc.png" not in names
    for path in figures:
        assert path.read_bytes()[:8] == PNG_MAGIC
        height, width, _ = imread(path).shape
        assert height > 100 and width > 100
        assert f"](report/{path.name})" in report


def test_a_metric_missing_in_some_jobs_is_shown_as_missing(sweep, tmp_path):
    import shutil

    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    for job in (0, 1, 3):  # val/acc: kept only in job 2 (experts=4, seed 1)
        record = job_metrics(copy, job)
        del record["val/acc"]
        (copy / str(job) / "metrics.json").write_text(json.dumps(record))
    report = write_report(copy).read_text()
    header = table_header(report)
    column = header.index("val/acc")
    only = job_metrics(copy, 2)["val/acc"]
    assert table_row(report, "4")[column] == f"{only:.4g} (n=1), missing in 1"
    assert table_row(report, "8")[column] == "missing"


def test_a_folder_without_jobs_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moelab: error: ") and "\n" not in err and "multirun folder" in err


def test_a_baseline_gives_welch_tests_with_holms_correction(sweep):
    from scipy import stats

    from moelab.sweeps.report import write_report

    report = write_report(sweep, ["val/acc", "val/loss"], baseline={"experts": "4"}).read_text()
    rows = [line for line in report.splitlines() if line.startswith("| experts=8 |")]
    assert len(rows) == 2 and "Against experts=4 (Welch's t-test, Holm's correction over the 2 comparisons)" in report
    from moelab.sweeps.jobs import collect_jobs

    jobs = collect_jobs(sweep)
    values = {e: [job["metrics"]["val/acc"] for job in jobs if job["overrides"]["experts"] == e] for e in ("4", "8")}
    assert len(values["4"]) == len(values["8"]) == 2
    p = stats.ttest_ind(values["8"], values["4"], equal_var=False).pvalue
    acc_row = next(row for row in rows if "| val/acc |" in row)
    assert f"Welch p = {p:.2g})" in acc_row
