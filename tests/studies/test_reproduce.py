"""scripts/reproduce.py --quick: studies end to end on tiny runs, their page assembled.

One study of each kind, to keep the suite's time: the LM grid with its learning-curve figure
(moe_vs_dense), the ViT grid that writes routers.md's table (routers_vit), and one made
only of other studies' runs (specialisation). `python scripts/reproduce.py --quick` runs
them all."""

from __future__ import annotations

import re
import subprocess
import sys

from matplotlib.image import imread

from ..conftest import ROOT


CHOSEN = ["moe_vs_dense", "routers_vit", "specialisation"]


def test_quick_reproduction_runs_studies_of_every_kind_and_writes_the_page(tmp_path):
    result = subprocess.run([sys.executable, "scripts/reproduce.py", "--quick", "--out", str(tmp_path), "--study", *CHOSEN],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exit " not in result.stdout, result.stdout  # every sweep ended ok
    page = (tmp_path / "docs" / "results.md").read_text()
    from moelab.studies.catalogue import STUDIES

    for study in STUDIES:
        section = page.split(f"## {study.title}")[1].split("\n## ")[0]
        if study.name not in CHOSEN:
            assert "Not run yet" in section and f"--study {study.name}" in section, study.name
            continue
        assert "**Claim.**" in section and "Not run yet" not in section, study.name
        if study.metrics:  # a study of its own runs (specialisation reads the others')
            assert "python train.py -m" in section, study.name
            assert re.search(r"\| \S.* \(n=1\) \|", section), f"{study.name}: no table of results"
    # routers.md's table comes from the routers_vit study: one row per router, and the twin.
    routers_page = (tmp_path / "docs" / "routers.md").read_text()
    table = routers_page.split("<!-- routers table")[1].split("<!-- end of routers table")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and " | 1 | " in line]
    assert len(rows) == 3 and "dense twin" in rows[-1], table
    figures = re.findall(r"\]\(results/([^)]+)\)", page)
    assert any("expert_class" in f for f in figures) and any("expert_token_category" in f for f in figures)
    for name in figures:
        assert imread(tmp_path / "docs" / "results" / name).shape[0] > 100
