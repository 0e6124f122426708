"""End to end: `train.py` and `moelab.run.train.run` on the bundled digits, a few steps each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import MissingConfigException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moelab.callbacks.tags import tokens_per_expert_tag
from moelab.moe.errors import ConfigError
from moelab.run.train import run

from ..conftest import ROOT, compose_config
from ..stops import RecordWeights

FAST = ("debug=default", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1")


def train_cli(
    run_dir: Path, *overrides: str, env: dict[str, str] | None = None, new_session: bool = False
) -> subprocess.CompletedProcess:
    """`python train.py` in a subprocess (`new_session`: in a process group of its own)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    flags = [o for o in overrides if o.startswith("-")]  # e.g. -m must precede the overrides
    overrides = tuple(o for o in overrides if not o.startswith("-"))
    return subprocess.run(
        [sys.executable, "train.py", *flags, f"hydra.run.dir={run_dir}", *overrides],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300, start_new_session=new_session,
    )


def test_cli_run_writes_metrics_config_checkpoint_and_histograms(tmp_path):
    run_dir = tmp_path / "run"
    result = train_cli(run_dir, *FAST, "callbacks.expert_utilisation.every_n_steps=1", "data.batch_size=16")
    assert result.returncode == 0, result.stderr[-3000:]

    metrics = json.loads((run_dir / "metrics.json").read_text())
    for name in ("val/acc", "val/loss", "test/acc", "train/loss", "train/aux/balance", "train/aux/zloss"):
        assert isinstance(metrics[name], float), name
    assert 0.0 <= metrics["val/acc"] <= 1.0
    assert (run_dir / ".hydra" / "config.yaml").read_text().splitlines().count("experts: 8") == 1  # the top-level key
    assert (run_dir / "checkpoints" / "last.ckpt").exists()

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"histograms": 0})
    events.Reload()
    tags = [tag for tag in events.Tags()["histograms"] if tag.endswith("/tokens_per_expert")]
    assert sorted(tags) == sorted([tokens_per_expert_tag(1), tokens_per_expert_tag(3)])
    # Dropless top-2: the experts' counts add up to tokens × k for every logged step.
    tokens = 16 * 16  # batch × patches
    for tag in tags:
        steps = events.Histograms(tag)
        assert len(steps) == 3
        for event in steps:
            assert len(event.histogram_value.bucket) == 8
            assert sum(event.histogram_value.bucket) == tokens * 2
    # Throughput is a machine reading: TensorBoard only (no train/mfu on a CPU).
    assert "train/images_per_s" not in metrics and "train/mfu" not in events.Tags()["scalars"]
    assert all(e.value > 0 for e in events.Scalars("train/images_per_s"))
    # Readable: the config tree first, one summary line last, the MoE settings as hparams.
    assert result.stdout.lstrip().startswith("config") and "router: topk (TopKRouter)" in result.stdout
    summary = [line for line in result.stdout.splitlines() if line.startswith("moelab: done")]
    assert len(summary) == 1 and f"metrics {run_dir / 'metrics.json'}" in summary[0]
    assert f"last {run_dir / 'checkpoints' / 'last.ckpt'}" in summary[0] and "test/acc" in summary[0]
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["router"].string_value == "topk" and start.hparams["experts"].number_value == 8
    assert start.hparams["k"].number_value == 2 and start.hparams["loss/balance"].number_value == 0.01
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["val/acc", "val/loss", "test/acc", "test/loss"]
    # The HPARAMS table's columns in order: the MoE settings, then the command line's keys,
    # the learning rate before the other task settings, optimiser internals left out.
    columns = [h.name for h in experiment.hparam_infos]
    assert columns[:4] == ["router", "experts", "k", "expert"], columns
    assert columns.index("callbacks.expert_utilisation.every_n_steps") < columns.index("lr") < columns.index("weight_decay")
    assert "betas" not in columns and "compile_backend" not in columns
    # The time-series page sorts tags: the epoch count is `trainer/epoch`, the lr `train/lr`.
    scalars = events.Tags()["scalars"]
    assert "epoch" not in scalars and "trainer/epoch" in scalars and "train/lr/pg1" in scalars, scalars
    # No terminal here: a plain line per logging step (3 steps, log_every_n_steps=1) and one per
    # validation, on the console and in train.log, which ends with the summary line.
    steps = [line for line in result.stdout.splitlines() if "moelab: step " in line]
    assert [line.split("moelab: step ")[1].split(" ")[0] for line in steps] == ["1/3", "2/3", "3/3"], steps
    assert all("train/loss" in line and "ms/step" in line and " lr " in line for line in steps), steps
    assert "images/s" in steps[-1]
    log_file = (run_dir / "train.log").read_text()
    assert [line for line in log_file.splitlines() if "moelab: step " in line] == steps
    assert "moelab: validation after step 3 (epoch 0) | val/acc" in log_file
    assert log_file.rstrip().splitlines()[-1] == summary[0]


def test_bad_config_is_one_line_without_traceback_or_run_folder(tmp_path):
    result = train_cli(tmp_path / "run", *FAST, "router.k=9")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == "moelab: error: router.k=9 must be between 1 and experts=8: lower router.k or raise experts"
    assert not (tmp_path / "run").exists()  # refused before training: nothing to keep


def test_help_shows_moelabs_usage_first_and_a_missing_plugin_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0].startswith("moelab: train Mixture-of-Experts models") and lines[2].startswith("Usage: python train.py")
    assert result.stdout.index("Examples:") < result.stdout.index("== Config groups ==") < result.stdout.index("== Config (the defaults")
    from moelab.run.cli import check_plugins

    with pytest.raises(SystemExit) as refused:
        check_plugins(["hparams_search=optuna"], find_spec=lambda name: None)
    assert refused.value.code == 1


def test_debug_wins_over_experiment_and_runs_are_named_by_what_sets_them_apart(make_cfg):
    cfg = make_cfg("experiment=lm_pystdlib", "debug=default")
    assert (cfg.trainer.max_epochs, cfg.trainer.log_every_n_steps, cfg.trainer.limit_train_batches) == (1, 1, 4)
    assert cfg.trainer.accelerator == "cpu" and cfg.model._target_.endswith("MoELM")  # the experiment still applies
    from moelab.run.names import run_name, shared_override_keys

    shared = shared_override_keys(["-m", "router=topk,switch", "experts=range(4,9,4)", "debug=default", "seed=0",
                                   "hydra.sweep.dir=x"])
    assert shared == {"debug", "seed"}
    assert run_name(["seed=0", "router=switch", "experts=8", "debug=default"], shared) == "experts=8,router=switch"
    assert run_name(["init_from=/a/b.ckpt", "ckpt_path=/c/last.ckpt"]) == "init_from=_a_b.ckpt"  # no folder levels


@pytest.mark.parametrize(
    "override,message",
    [
        ("experts=0", "experts=0: a MoE layer needs at least 1 expert"),
        ("router.capacity_factor=0", "router.capacity_factor=0 must be > 0"),
        ("model.moe_layers=[1,7]", "model.moe_layers has 7, outside a model of depth 4"),
        ("router=switch router.normalize=true", "set router.normalize=false"),
        ("data.batch_size=0", "data.batch_size=0 must be a positive integer"),
        ("data.num_workers=-1", "data.num_workers=-1 must be an integer >= 0"),
        ("task.lr=-0.01", "task.lr=-0.01 must be a positive number"),
        ("task.betas=[0.9,1.5]", "task.betas=[0.9, 1.5] must be two numbers in [0, 1)"),
        ("seed=abc", "seed='abc' must be a whole number"),
        ("experts=abc", "experts='abc' must be a whole number of experts"),
        ("ep=0", "ep=0 must be >= 1"),
        ("loss.balance=-1", "loss.balance=-1 is negative, which rewards what the balance loss penalises"),
        ("loss.zloss=abc", "loss.zloss=abc must be a number"),
        ("trainer=fsdp +trainer.gradient_clip_algorithm=value", "trainer=fsdp/fsdp_ep clip gradients by norm only"),
        # A setting of the wrong type, against the type its class takes (issue 26).
        ("router.k=1.5", "router.k=1.5 must be a whole number (the k of TopKRouter)"),
        ("data.batch_size=abc", "data.batch_size='abc' must be a whole number (the batch_size of DigitsDataModule)"),
        ("router.normalize=3", "router.normalize=3 must be true or false"),
        ("trainer.max_epochs=2.5", "trainer.max_epochs=2.5 must be a whole number (or null) (the max_epochs of Trainer)"),
        # Runs without what they claim.
        ("model.depth=0", "model.depth=0 builds no blocks"),
        ("++trainer.max_steps=0", "trainer.max_steps=0 trains nothing"),
        ("model.depth=1", "model.moe_every=2 puts a MoE layer in every 2nd block, and a model of depth 1 has none"),
        pytest.param("trainer=ddp8 trainer.accelerator=gpu trainer.devices=8", "but this machine has no GPU: run on the CPU with trainer.accelerator=cpu "
                     "trainer.devices=8", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine")),
    ],
)
def test_bad_config_messages(tmp_path, override, message):
    cfg = compose_config(tmp_path, *FAST, *override.split())
    with pytest.raises(SystemExit) as info:
        run(cfg)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert str(info.value).startswith("moelab: error: ")
    record = strict_json(tmp_path / "metrics.json")
    assert record["status"] == "error" and message in record["reason"]


def test_the_dense_twin_says_so_in_the_config_tree_and_the_summary_line(tmp_path, capsys):
    for twin in ("model.moe_every=0", "model.moe_layers=[]"):
        run(compose_config(tmp_path / twin, *FAST, twin))
        assert strict_json(tmp_path / twin / "metrics.json")["status"] == "ok"
    from moelab.run.summary import config_tree, summary_line

    tree = config_tree({"model": {"_target_": "moelab.models.vit.MoEViT", "moe_layers": []}}, {"model": "vit"})
    assert "dense twin" in str(tree.children[0].label)
    assert summary_line({}, None, None, "m.json", 3.0, dense_twin=True).startswith("moelab: done (dense twin) in 3 s")


def test_a_negative_entropy_weight_is_allowed_since_its_sign_picks_the_direction(tmp_path):
    """The run ends ok and the weight reaches the loss with its sign: the last step's
    train/loss is train/ce plus, for each MoE layer, Σ weight × unweighted loss, worked out
    here from the logged train/aux/<name> (means over the layers) with entropy's −1e-3. With
    the weight's absolute value the loss would be 4e-3 × the entropy larger."""
    from moelab.models.build import build_model
    from moelab.moe.routed import moe_layers

    cfg = compose_config(tmp_path, *FAST, "+loss.entropy=-1e-3")
    run(cfg)
    metrics = strict_json(tmp_path / "metrics.json")
    assert metrics["status"] == "ok"
    layers = len(moe_layers(build_model(cfg)))
    weights = {"balance": 0.01, "zloss": 0.001, "entropy": -1e-3}
    assert dict(cfg.loss) == weights and layers == 2
    aux = sum(weight * metrics[f"train/aux/{name}"] for name, weight in weights.items())
    assert metrics["train/aux/entropy"] > 1.0  # near ln 8 at the start: the term is not negligible
    assert metrics["train/loss"] == pytest.approx(metrics["train/ce"] + layers * aux, abs=1e-5)


def test_debug_switch_keeps_the_traceback(tmp_path, monkeypatch):
    verbose_result = train_cli(tmp_path / "b", *FAST, "experts=abc", "hydra.verbose=true")
    assert verbose_result.returncode == 1 and "Traceback" in verbose_result.stderr
    assert "ConfigError: experts='abc' must be a whole number" in verbose_result.stderr
    monkeypatch.setenv("MOELAB_DEBUG", "1")  # the same switch by environment: the error itself propagates
    with pytest.raises(ConfigError, match="experts='abc' must be a whole number"):
        run(compose_config(tmp_path / "a", *FAST, "experts=abc"))


def test_unknown_group_option_lists_the_options(tmp_path):
    with pytest.raises(MissingConfigException, match="topk"):
        compose_config(tmp_path, "router=nonexistent")


def test_ddp8_composes_and_stops_cleanly_without_gpus(tmp_path):
    cfg = compose_config(tmp_path, "trainer=ddp8")
    assert cfg.trainer.devices == 8 and cfg.trainer.strategy == "ddp" and cfg.trainer.accelerator == "gpu"
    if torch.cuda.device_count() >= 8:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(SystemExit) as info:
        run(cfg)
    assert str(info.value).startswith("moelab: error:") and "\n" not in str(info.value)


def test_experts_override_reaches_every_moe_layer(tmp_path):
    cfg = compose_config(tmp_path, "experts=16", "model.moe_every=1")
    assert cfg.expert.num_experts == 16


def test_switch_swiglu_16_experts_trains_and_returns_metric(tmp_path):
    cfg = compose_config(tmp_path, *FAST, "router=switch", "expert=swiglu", "experts=16", "loss=balance_zloss")
    value = run(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert value == metrics["val/acc"]
    assert all(v == v for v in metrics.values()), "no NaN"
    assert 0.5 < metrics["train/aux/balance"] < 16


def test_seeded_runs_are_identical_on_cpu(tmp_path):
    results = []
    for name in ("a", "b"):
        cfg = compose_config(tmp_path / name, *FAST, "trainer.limit_val_batches=2")
        run(cfg)
        results.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    assert results[0] == results[1]


def test_resume_from_checkpoint_continues_training(tmp_path):
    first = compose_config(tmp_path / "first", *FAST, "trainer.max_epochs=1")
    run(first)
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3

    second = compose_config(tmp_path / "second", *FAST, "trainer.max_epochs=2", f"ckpt_path={last}")
    run(second)
    resumed = torch.load(tmp_path / "second" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 6 and resumed["epoch"] == 1


def test_last_ckpt_is_the_final_step_and_best_is_separate(tmp_path):
    # Epoch 0 ends at step 4 (a checkpoint then); max_steps stops in the middle of epoch 1.
    run(compose_config(tmp_path, *FAST, "trainer.limit_train_batches=4", "trainer.max_epochs=3", "++trainer.max_steps=6"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["step"] == 6 and metrics["status"] == "ok"
    checkpoints = tmp_path / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 6
    (best,) = checkpoints.glob("best-epoch*.ckpt")
    assert torch.load(best, weights_only=True)["global_step"] == 4  # the only validation was at step 4
    assert not list(checkpoints.glob(".*"))  # no partial checkpoint left behind


def test_a_run_stopped_by_max_time_saves_the_step_it_reached(tmp_path):
    run(compose_config(tmp_path, *FAST, "trainer.limit_train_batches=null", "trainer.max_epochs=1000",
                       "++trainer.max_time=00:00:00:02"))
    metrics = strict_json(tmp_path / "metrics.json")
    assert metrics["status"] == "ok" and 0 < metrics["step"] < 1000 * 20
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == metrics["step"]


def strict_json(path: Path) -> dict:
    def refuse(constant: str):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.parametrize("log_every", [1, 1000], ids=["checked_every_step", "found_at_the_epoch_end_save"])
def test_divergence_stops_at_that_step_names_the_router_and_keeps_the_good_checkpoint(tmp_path, recwarn, log_every):
    """Epoch 0 (steps 0-3) ends with a checkpoint; step 5 makes layer 1's router logits inf.
    The guard decides on the device: logging every step, the host sees it at step 5; logging
    every 1000 steps, only when epoch 1 ends (step 8) and its checkpoint is due. Either way the
    run names step 5 and its cause, the updates from step 5 on were skipped, and no checkpoint
    after step 4 exists."""
    cfg = compose_config(
        tmp_path, *FAST, "trainer.limit_train_batches=4", "trainer.max_epochs=3", f"trainer.log_every_n_steps={log_every}",
        "callbacks.collapse_alarm.patience=1", "+callbacks.poison._target_=tests.stops.PoisonRouterAt",
        "+callbacks.poison.step=5", "+callbacks.weights._target_=tests.stops.RecordWeights",
    )
    with pytest.raises(SystemExit) as stop:
        run(cfg)
    last = tmp_path / "checkpoints" / "last.ckpt"
    message = str(stop.value)
    assert message.startswith("moelab: error: training diverged at step 5: ") and "\n" not in message
    assert "the router of MoE layer 1 (model.vit.blocks.1.mlp.router) gave non-finite logits first" in message
    assert f"last good checkpoint: {last} (step 4)" in message

    record = strict_json(tmp_path / "metrics.json")
    assert record["status"] == "diverged" and record["step"] == 5 and record["reason"] in message
    for checkpoint in (last, *(tmp_path / "checkpoints").glob("best-*.ckpt")):
        state = torch.load(checkpoint, weights_only=True)
        assert state["global_step"] == 4
        assert all(torch.isfinite(t).all() for t in state["state_dict"].values() if t.is_floating_point())
    after = RecordWeights.last.after_steps  # the weights after n optimizer steps
    assert max(after) == (8 if log_every == 1000 else 5)
    for steps in range(6, max(after) + 1):  # step 5 on were skipped on the device (the poisoned weight aside)
        assert all(torch.equal(a, b) for a, b in zip(after[steps], after[5]) if torch.isfinite(a).all())
    alarms = [str(w.message) for w in recwarn if "dead experts at step" in str(w.message)]
    assert not [a for a in alarms if int(a.split("dead experts at step ")[1].split(":")[0]) >= 5]  # quiet on the NaN step


def test_diverging_cli_run_exits_1_with_one_line(tmp_path):
    result = train_cli(tmp_path / "run", *FAST, "task.lr=1e3", "callbacks.progress=null")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("moelab: error: training diverged at step ") and "lower task.lr (here 1000)" in last
    assert strict_json(tmp_path / "run" / "metrics.json")["status"] == "diverged"


def test_a_run_too_short_to_validate_warns_and_ends_ok(tmp_path):
    # In-process: train.py's exit code is run()'s ending (0 when it returns; the CLI tests above show it).
    with pytest.warns(UserWarning, match="optimized_metric 'val/acc' was not logged"):
        assert run(compose_config(tmp_path / "run", "++trainer.max_steps=3", "++trainer.max_epochs=1",
                                  "callbacks.progress=null")) is None
    metrics = strict_json(tmp_path / "run" / "metrics.json")
    assert metrics["status"] == "ok" and metrics["step"] == 3 and "val/acc" not in metrics
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


def test_a_gpu_trainer_larger_than_the_machine_names_what_it_has():
    from moelab.run.build import check_devices

    with pytest.raises(ConfigError, match="trainer.devices=8 asks for 8 GPUs, but this machine has 2: set trainer.devices=2"):
        check_devices("gpu", 8, gpus_here=2)
    with pytest.raises(ConfigError, match="no GPU: run on the CPU with trainer=cpu"):
        check_devices("gpu", 1, gpus_here=0)
    check_devices("gpu", 2, gpus_here=2)
    check_devices("gpu", 8, num_nodes=2, gpus_here=4)  # each node checks its own
    check_devices("cpu", 8, gpus_here=0)
