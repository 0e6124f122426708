"""Every `python train.py …` (and eval.py, predict.py, generate.py) command in README.md and
docs/*.md composes as written: its groups, options and keys exist, so a typo or a renamed
setting in a doc fails here, not for a reader. Placeholders (`<run>`) stand for paths;
commands with an ellipsis are sketches and are skipped."""

from __future__ import annotations

import re
import shlex

import pytest

from moelab.run.cli import check_overrides, positional_checkpoint, prepare

from .conftest import ROOT

ENTRY = re.compile(r"python (train|eval|predict|generate)\.py\b")


def doc_commands() -> list[tuple[str, str]]:
    """(where, command) for each command in the docs: code lines (with `\\` continuations
    joined) and inline code spans."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            line, number = lines[i], i + 1
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            for match in ENTRY.finditer(line):
                rest = line[match.start():]
                inline = line[:match.start()].count("`") % 2 == 1  # inside a `code span`
                command = rest.split("`", 1)[0] if inline else rest
                ends = r"\s+#|\s+&&|\s+\|" + (r"|:\s" if line.lstrip().startswith("|") else "")  # a table cell's prose
                command = re.split(ends, command, maxsplit=1)[0].strip()
                found.append((f"{path.name}:{number}", command))
            i += 1
    return found


COMMANDS = doc_commands()


def test_the_docs_have_commands_to_check():
    assert len(COMMANDS) > 50 and any("data.root=~/data" in c for _, c in COMMANDS)


@pytest.mark.parametrize("where, command", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_a_documented_command_composes(where, command, capsys):
    if "…" in command or "..." in command:
        pytest.skip("a sketch, not a command")
    words = shlex.split(re.sub(r"<[^>]*>", "PLACEHOLDER", command))
    script, args = words[1].removesuffix(".py"), words[2:]
    args = prepare(args, checkpoint=script != "train")
    if script == "eval":
        from moelab.use.evaluate import split_run_overrides

        _, args = split_run_overrides(positional_checkpoint(args))
    try:
        check_overrides(args, script)
    except SystemExit:
        pytest.fail(f"{where}: `{command}` does not compose: {capsys.readouterr().err.strip()}")
