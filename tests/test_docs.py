"""The repository's documentation stands alone: no file refers to a file outside the
repository (links to papers and public code are fine), and docs/equations.md defines every
router, expert and loss the configs offer."""

from __future__ import annotations

import re
import subprocess
import sys

from moelab.moe.losses import AUX_LOSSES

from .conftest import CONF, ROOT

EQUATIONS = ROOT / "docs" / "equations.md"


def tracked_text_files():
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in names:
        path = ROOT / name
        if path.suffix in {".py", ".md", ".yaml", ".toml", ".txt", ".cfg", ""} and path.is_file():
            yield name, path.read_text(errors="replace")


def test_no_file_refers_outside_the_repository():
    outside = re.compile(r"\.\./shared|shared/(EQUATIONS|DESIGN|STYLE)\.md")
    offenders = [name for name, text in tracked_text_files() if outside.search(text)]
    assert offenders == []


def test_equations_doc_covers_every_router_expert_and_loss():
    text = EQUATIONS.read_text()
    for group in ("router", "expert"):
        for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
            assert f"`{option}`" in text, f"{group}={option} is not in docs/equations.md"
    for name in AUX_LOSSES:
        assert f"`{name}`" in text, f"loss {name} is not in docs/equations.md"
    for term in ("noise_epsilon", "tensor2tensor", "C = ⌈cf · k · T / E⌉", "bytes_per_token"):
        assert term in text, term


def test_docs_link_the_equations_doc():
    for doc in ("README.md", "docs/routers.md"):
        assert "docs/equations.md" in (ROOT / doc).read_text() or "equations.md" in (ROOT / doc).read_text(), doc


def test_the_readme_config_table_is_current():
    """scripts/config_table.py --check: the README lists every option of conf/ with its file's own first sentence."""
    result = subprocess.run([sys.executable, "scripts/config_table.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_layout_section_names_paths_that_exist_and_every_package():
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("```", 2)[1]
    named = [line.split()[0].rstrip(",") for line in layout.splitlines() if line.strip() and not line.startswith(" ")]
    missing = [name for name in named if not (ROOT / name).exists()]
    assert missing == [], missing
    packages = sorted(p.relative_to(ROOT).as_posix() + "/" for p in (ROOT / "src" / "moelab").iterdir()
                      if p.is_dir() and (p / "__init__.py").exists())
    assert [p for p in packages if p not in named] == []
