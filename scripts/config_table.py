"""Write the README's config-group table from conf/: `python scripts/config_table.py` (`--check`:
exit 1 if the README's table is not current; tests/test_docs.py runs it).

Every option is one row: its group, its name, and the first sentence of the comment that
opens its YAML file (the file documents itself; this table only gathers the first lines)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
START, END = "<!-- config-table: start (scripts/config_table.py writes it) -->", "<!-- config-table: end -->"
# The groups a user picks from, in reading order (hydra/ and paths/ are plumbing).
GROUPS = ("router", "expert", "loss", "model", "data", "tokenizer", "task", "trainer", "debug", "callbacks", "logger",
          "experiment", "hparams_search")


ABBREVIATIONS = ("al", "e.g", "i.e", "vs", "cf")


def description(path: Path) -> str:
    """The first sentence of the comment block that opens a YAML file."""
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith("# @package"):
            continue
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    # The first ". " that ends a sentence, not an abbreviation ("et al. 2022", "e.g. x").
    for match in re.finditer(r"[.!?](\s|$)", text):
        word = text[: match.start()].rsplit(" ", 1)[-1]
        if word not in ABBREVIATIONS:
            text = text[: match.start() + 1]
            break
    return text.replace("|", "\\|")


def table() -> str:
    rows = ["| group | option | what it is |", "|---|---|---|"]
    for group in GROUPS:
        for n, path in enumerate(sorted((ROOT / "conf" / group).glob("*.yaml"))):
            rows.append(f"| {'`' + group + '`' if n == 0 else ''} | `{path.stem}` | {description(path)} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md's table is not current")
    args = parser.parse_args()
    text = README.read_text()
    if START not in text or END not in text:
        print(f"README.md has no {START} ... {END} block", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{table()}\n{END}{tail}"
    if args.check:
        if new != text:
            print("README.md's config table is not current: run python scripts/config_table.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
