"""Using a trained model: eval.py reproduces the run's test metrics and logs the expert views
of the evaluated data, generate.py equals a greedy loop at temperature 0, predict.py
classifies a folder of PNGs, and every checkpoint carries the run's config."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import moelab
from moelab.data.digits import DigitsDataModule
from moelab.data.tokenization import make_tokenizer
from moelab.moe.errors import ConfigError
from moelab.tasks.checkpoint_io import CONFIG_KEY
from moelab.use.evaluate import apply_run_overrides, split_run_overrides
from moelab.use.generate import main_generate
from moelab.use.predict import main_predict

from ..conftest import ROOT


def cli(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_eval_reproduces_the_runs_test_metrics_and_logs_the_expert_views(tmp_path, trained_vit):
    ckpt = trained_vit / "checkpoints" / "last.ckpt"
    result = cli("eval.py", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'eval'}", "callbacks.progress=null")
    assert result.returncode == 0, result.stderr[-3000:]
    trained = json.loads((trained_vit / "metrics.json").read_text())
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    tests = {name: value for name, value in trained.items() if name.startswith("test/")}
    assert tests and {name: evaluated[name] for name in tests} == tests  # exactly
    assert evaluated["status"] == "ok" and evaluated["step"] == trained["step"]
    assert f"metrics: {tmp_path / 'eval' / 'metrics.json'}" in result.stdout
    events = EventAccumulator(str(tmp_path / "eval" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    images = events.Tags()["images"]
    assert {"moe/load_heatmap", "moe/layer1/expert_class", "moe/layer3/expert_position"} <= set(images), images
    # The best checkpoint carries the config too (every checkpoint does).
    best = next((trained_vit / "checkpoints").glob("best-*.ckpt"))
    assert torch.load(best, weights_only=True)[CONFIG_KEY]["experts"] == 8
    assert isinstance(moelab.load(best), torch.nn.Module)


def test_eval_overrides_change_the_data_and_never_the_model():
    run, rest = split_run_overrides(["data.batch_size=16", "split=val", "trainer.limit_test_batches=null", "data=digits_hard"])
    assert run == ["data.batch_size=16", "trainer.limit_test_batches=null", "data=digits_hard"] and rest == ["split=val"]
    with pytest.raises(ConfigError, match="model.depth is part of the trained model"):
        split_run_overrides(["model.depth=3"])
    saved = {"data": {"_target_": "moelab.data.digits.DigitsDataModule", "batch_size": 64}, "trainer": {"devices": 1}}
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        merged = apply_run_overrides(saved, ["data.batch_size=16", "+trainer.limit_test_batches=2"])
        assert merged.data.batch_size == 16 and merged.trainer.limit_test_batches == 2
        with pytest.raises(ConfigError, match="data.nokey is not in the run's config"):
            apply_run_overrides(saved, ["data.nokey=1"])
        hard = apply_run_overrides(saved, ["data=digits_hard"])  # another option of the group, resolved
        assert hard.data.erase_size == 3 and hard.data.seed == 0


def greedy_loop(model, ids: list[int], steps: int, context: int) -> list[int]:
    """The continuation a greedy decoder must produce, written out."""
    tokens = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([tokens[-context:]]))[0, -1]
            tokens.append(int(logits.argmax()))
    return tokens[len(ids):]


def test_generate_at_temperature_0_is_the_greedy_loop_and_reports_the_experts(trained_lm):
    ckpt = trained_lm / "checkpoints" / "last.ckpt"
    cfg = {"ckpt_path": str(ckpt), "max_new_tokens": 12, "temperature": 0.0, "top_k": None, "seed": 0, "device": "cpu"}
    stream, lines = io.StringIO(), []
    ids = main_generate(cfg, "def ", stream, lines.append)
    model = moelab.load(ckpt)
    assert ids == greedy_loop(model, list(b"def "), 12, context=32)
    assert stream.getvalue() == "def " + make_tokenizer("bytes").decode(ids) + "\n"
    assert main_generate(cfg, "def ", io.StringIO(), lambda line: None) == ids  # deterministic
    # One line per MoE layer, the shares of its 12 tokens' choices (k=2 each).
    assert lines[0] == "experts used by the 12 generated tokens (share of each MoE layer's choices):"
    assert [line.split(":")[0] for line in lines[1:]] == ["  layer 1"]
    sampled = main_generate({**cfg, "temperature": 0.8, "top_k": 5, "seed": 1}, "def ", io.StringIO(), lambda line: None)
    assert sampled == main_generate({**cfg, "temperature": 0.8, "top_k": 5, "seed": 1}, "def ", io.StringIO(),
                                    lambda line: None)  # a seed fixes the draws


def test_generate_cli_takes_the_prompt_verbatim_and_refuses_a_vision_model(trained_lm, trained_vit):
    # The checkpoint as the first word (ckpt_path= works too), top_p beside top_k.
    result = cli("generate.py", str(trained_lm / "checkpoints" / "last.ckpt"), "prompt=def  f(x ", "max_new_tokens=3",
                 "temperature=0", "top_p=0.9")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("def  f(x ") and "layer 1:" in result.stderr
    assert not (ROOT / ".hydra").exists()  # no run folder in the working directory
    with pytest.raises(ConfigError, match="holds a MoEViT, not a language model"):
        main_generate({"ckpt_path": str(trained_vit / "checkpoints" / "last.ckpt"), "max_new_tokens": 1,
                       "temperature": 0.0}, "def ", io.StringIO())


def test_predict_classifies_a_folder_of_pngs_like_the_model_on_the_dataset(tmp_path, trained_vit):
    data = DigitsDataModule()
    data.setup()
    rows = data.indices["test"][:5]
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder = tmp_path / "pngs"
    folder.mkdir()
    for n, row in enumerate(rows.tolist()):  # 8x8 grayscale, ink bright, as the dataset's images
        Image.fromarray(np.round(digits.images[row] * 255 / 16).astype(np.uint8)).save(folder / f"{n}.png")
    (folder / "notes.txt").write_text("not an image")
    out = io.StringIO()
    records = main_predict({"ckpt_path": str(trained_vit / "checkpoints" / "last.ckpt"), "images": str(folder),
                            "top_experts": 2}, out)
    model = moelab.load(trained_vit / "checkpoints" / "last.ckpt")
    with torch.no_grad():
        probs = model(data.splits["test"].tensors[0][:5]).softmax(-1)
    assert [r["file"].rsplit("/", 1)[-1] for r in records] == [f"{n}.png" for n in range(5)]
    for record, p in zip(records, probs):
        assert record["class"] == str(int(p.argmax()))
        assert record["probability"] == pytest.approx(float(p.max()), abs=2e-3)  # 8-bit pixels vs the float dataset
        assert sorted(record["experts"]) == [1, 3] and all(len(pairs) == 2 for pairs in record["experts"].values())
    assert len(out.getvalue().splitlines()) == 5
    # out=.csv / .json: the same predictions in a file, one row (record) per image.
    import csv as csv_module

    for name in ("preds.csv", "preds.json"):
        main_predict({"ckpt_path": str(trained_vit / "checkpoints" / "last.ckpt"), "images": str(folder),
                      "top_experts": 2, "out": str(tmp_path / name)}, io.StringIO())
    rows = list(csv_module.DictReader((tmp_path / "preds.csv").open()))
    assert [r["class"] for r in rows] == [r["class"] for r in records]
    assert [float(r["probability"]) for r in rows] == pytest.approx([r["probability"] for r in records], abs=1e-6)
    assert rows[0]["layer 1 experts"].count(":") == 2  # two experts, e<i>:<share>
    saved = json.loads((tmp_path / "preds.json").read_text())
    assert [s["file"] for s in saved] == [r["file"] for r in records]
    assert [e["expert"] for e in saved[0]["experts"]["1"]] == [e for e, _ in records[0]["experts"][1]]
    with pytest.raises(ConfigError, match="name a .csv or .json file"):
        main_predict({"ckpt_path": str(trained_vit / "checkpoints" / "last.ckpt"), "images": str(folder),
                      "out": str(tmp_path / "preds.txt")})
    with pytest.raises(ConfigError, match="holds no image files"):
        main_predict({"ckpt_path": str(trained_vit / "checkpoints" / "last.ckpt"), "images": str(tmp_path)})
