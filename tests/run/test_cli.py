"""The command line before Hydra: typos answered in one line with the closest valid name, `~`
and `$VAR` in path settings, the checkpoint as the first word of every entry point, each
entry point's own --help, and quiet runs (no third-party tips or deprecations)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moelab.run.cli import check_overrides, expand_paths, positional_checkpoint

from ..conftest import ROOT


def refusal(capsys, args: list[str], config: str = "train") -> str:
    with pytest.raises(SystemExit) as ended:
        check_overrides(args, config)
    assert ended.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["router=swich"], "router=swich: no such router; did you mean switch? options: aux_free, cosine,"),
    (["data=digit"], "data=digit: no such data; did you mean digits?"),
    (["experiment=lm_stdlib"], "experiment=lm_stdlib: no such experiment; did you mean lm_pystdlib?"),
    (["logger=[tensorboard,wandbb]"], "logger=wandbb: no such logger; did you mean wandb?"),
    (["-m", "router=topk,swich"], "router=swich: no such router; did you mean switch?"),
    (["trainer.max_step=20"], "trainer.max_step=20: trainer has no setting max_step; did you mean max_steps?"),
    (["trainer.fast_dev_run=2"], "trainer.fast_dev_run=2: trainer.fast_dev_run is a setting of Trainer that the "
                                 "config does not list: add it with +trainer.fast_dev_run=2"),
    (["routr=switch"], "routr=switch: no config group or setting routr; did you mean router?"),
    (["router.kk=2"], "router.kk=2: router has no setting kk; did you mean k?"),
    (["trainer.max_steps=[1"], "trainer.max_steps=[1: Hydra cannot read it"),
])
def test_typos_are_one_line_with_the_closest_name(capsys, args, expected):
    line = refusal(capsys, args)
    assert line.startswith(f"moelab: error: {expected}"), line
    assert "+trainer.max_step" not in line  # never the advice to add the typo


def test_valid_command_lines_pass(capsys):
    for args in (["router=switch", "experts=16"], ["-m", "router=topk,switch", "seed=0,1"], ["logger=[tensorboard,csv]"],
                 ["experiment=lm_pystdlib", "model.moe_every=0"], ["+trainer.fast_dev_run=2"]):
        check_overrides(args, "train")
    check_overrides(["ckpt_path=x.ckpt", "max_new_tokens=3", "top_p=0.9"], "generate")
    assert capsys.readouterr().err == ""


def test_an_unknown_trainer_or_data_argument_is_refused_before_anything_is_built(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "++trainer.max_stepz=5", f"hydra.run.dir={tmp_path / 'run'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == ("moelab: error: trainer.max_stepz is not a setting of Trainer; "
                                                      "did you mean max_steps?")
    assert not (tmp_path / "run").exists()  # no run folder left


def test_home_and_variables_expand_in_path_settings_only(monkeypatch):
    monkeypatch.setenv("HOME", "/home/me")
    monkeypatch.setenv("RUNS", "/data/my runs")
    assert expand_paths(["data.root=~/data", "init_from=$RUNS/a.ckpt", "task.lr=3e-4",
                         "model.expert_hidden=${model.ffn_hidden}", "data.root=${oc.env:X}"]) == [
        "data.root=/home/me/data", "init_from='/data/my runs/a.ckpt'", "task.lr=3e-4",
        "model.expert_hidden=${model.ffn_hidden}", "data.root=${oc.env:X}"]
    monkeypatch.delenv("NOPE", raising=False)
    with pytest.raises(SystemExit):
        expand_paths(["ckpt_path=$NOPE/last.ckpt"])


def test_the_checkpoint_is_the_first_word_or_ckpt_path():
    assert positional_checkpoint(["a/last.ckpt", "split=val"]) == ["ckpt_path=a/last.ckpt", "split=val"]
    assert positional_checkpoint(["ckpt_path=a/last.ckpt"]) == ["ckpt_path=a/last.ckpt"]
    assert positional_checkpoint(["a b/x=1.ckpt"]) == ["a b/x=1.ckpt"]  # has "=": a setting, as Hydra reads it
    assert positional_checkpoint(["--verbose", "my run/last.ckpt"]) == ["--verbose", "ckpt_path='my run/last.ckpt'"]


@pytest.mark.parametrize("script, first", [("eval.py", "moelab eval:"), ("predict.py", "moelab predict:"),
                                           ("generate.py", "moelab generate:")])
def test_each_entry_point_has_its_own_help(script, first, monkeypatch, capsys):
    """The script run as `python <script> --help` (in this process: runpy, as __main__)."""
    import runpy

    monkeypatch.setattr(sys, "argv", [script, "--help"])
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    out = capsys.readouterr().out
    assert info.value.code in (0, None) and out.startswith(first), out[:200]
    assert "Usage: python " + script in out and "== Config groups ==" not in out


def test_a_run_is_quiet_about_third_party_tips_and_deprecations(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "debug=default", "trainer.limit_train_batches=2",
                             f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout + result.stderr
    for noise in ("💡 Tip", "LeafSpec", "Total FLOPs", "v_num"):
        assert noise not in out, noise
    verbose = subprocess.run([sys.executable, "train.py", "--verbose", "debug=default", "trainer.limit_train_batches=1",
                              "test=false", f"hydra.run.dir={tmp_path / 'verbose'}"], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert verbose.returncode == 0 and "LeafSpec" in verbose.stdout + verbose.stderr
