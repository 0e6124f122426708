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


def test_the_export_carries_a_tokenizer_that_round_trips_bytes(tmp_path):
    """The byte-level LM's export holds a tokenizer: AutoTokenizer loads it, encodes text to its
    UTF-8 bytes (ids 0..255, as moelab's data did) and decodes them back. The stdlib data's
    vocabulary (256) has no end-of-text; a byte tokenizer with one (vocabulary 320, as
    data=hf_text tokenizer=bytes makes) gets end-of-text 256 as eos and pad id."""
    from moelab.use.export_hf import hf_tokenizer

    checkpoint, _ = random_checkpoint(tmp_path)
    out = export(str(checkpoint), tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "def f(x):\n    return x ** 2  # é, ∑, 🙂\t"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id is None and transformers.AutoConfig.from_pretrained(out).eos_token_id is None
    with_eos = hf_tokenizer({"data": {"_target_": "moelab.data.text.HFTextDataModule",
                                      "tokenizer": {"kind": "bytes", "name": None}}}, vocab_size=320)
    with_eos.save_pretrained(tmp_path / "tok")
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.eos_token_id == loaded.pad_token_id == 256
    assert loaded(text, add_special_tokens=False)["input_ids"] == list(text.encode("utf-8"))
