"""scripts/export_hf.py: a moelab LM written as Hugging Face's Qwen2MoeForCausalLM gives the same
logits (fp32, 1e-4) when `transformers` loads it; settings HF has no equivalent for are refused."""

from __future__ import annotations

import runpy
import sys

import pytest
import torch

from moelab.models.build import build_model
from moelab.moe.errors import ConfigError
from moelab.run.train import plain_config
from moelab.tasks.checkpoint_io import save_model_state
from moelab.use.export_hf import export

from ..conftest import LM_FAST, ROOT, compose_config

transformers = pytest.importorskip("transformers")


def random_checkpoint(folder, *overrides: str, sharded: bool = False):
    """A checkpoint of the LM `overrides` configure, every weight drawn at random (so routing,
    RoPE and every projection matter), written as train.py's checkpoints are."""
    cfg = compose_config(folder, *LM_FAST, *overrides)
    model = build_model(cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    return save_model_state(folder / ("sharded" if sharded else "model.ckpt"), model.state_dict(), plain_config(cfg),
                            sharded), model


@pytest.mark.parametrize("overrides", [(), ("expert=deepseek", "model.moe_every=1", "model.ffn_hidden=128"),
                                       ("router=gshard", "router.capacity_factor=null", "router.eval_capacity_factor=null", "model.tie_embeddings=false")],
                         ids=["topk_dense_blocks", "deepseek_shared_experts", "gshard_untied"])
def test_transformers_loads_the_export_with_moelabs_logits(tmp_path, overrides):
    checkpoint, model = random_checkpoint(tmp_path, *overrides, sharded=overrides == ())
    out = export(str(checkpoint), tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "Qwen2MoeForCausalLM" and (out / "model.safetensors").is_file()
    ids = torch.randint(0, 256, (3, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model.eval()(ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("overrides, reason", [
    (("router=hash",), "only router=topk \\(softmax\\) and router=gshard export"),
    (("expert=mlp", "model.moe_every=1"), "only bias-free SwiGLU experts"),
    (("expert=mlp",), "dense FFN is gelu"),
    (("router.score=sigmoid",), "only router=topk \\(softmax\\)"),
    (("model.attention=moa",), "mixture of attention heads"),
])
def test_settings_without_an_hf_equivalent_are_refused_in_one_line(tmp_path, overrides, reason):
    checkpoint, _ = random_checkpoint(tmp_path, *overrides)
    with pytest.raises(ConfigError, match=reason):
        export(str(checkpoint), tmp_path / "hf")


def test_the_script_refuses_a_vision_checkpoint_in_one_line(tmp_path, monkeypatch, trained_vit):
    monkeypatch.setattr(sys, "argv", ["export_hf.py", str(trained_vit / "checkpoints" / "last.ckpt"), str(tmp_path / "hf")])
    with pytest.raises(SystemExit) as ended:
        runpy.run_path(str(ROOT / "scripts" / "export_hf.py"), run_name="__main__")
    assert ended.value.code == 1
    assert not (tmp_path / "hf").exists()
