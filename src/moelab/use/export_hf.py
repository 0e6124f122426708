"""Export a trained moelab language model as a Hugging Face `transformers` model.

moelab's LM (pre-norm RMSNorm, RoPE, SwiGLU FFNs, MoE FFNs in some blocks, softmax top-k
routing) maps exactly onto `Qwen2MoeForCausalLM`, the HF MoE class that allows dense blocks
between MoE blocks (`mlp_only_layers`) and renormalised top-k (`norm_topk_prob`):

- attention: `qkv` splits into q/k/v projections (Qwen2's q/k/v biases are set to 0). RoPE
  rotates adjacent pairs (x_2i, x_2i+1) here and halves (x_i, x_i+d/2) in HF, with the same
  frequencies; permuting each head's q and k rows (even dimensions first) turns one into the
  other and leaves every q·k unchanged;
- experts: `w1_EDF`/`w3_EDF`/`w2_EFD` become HF's fused `gate_up_proj` (E, 2F, D) and
  `down_proj` (E, D, F); the router's gate is HF's `gate.weight`;
- Qwen2-MoE adds a shared expert scaled by sigmoid(gate·x). DeepSeekMoE shared experts map
  onto it with that gate at 0 (sigmoid 0.5) and the down projection doubled; without shared
  experts its down projection is 0.

What has no HF equivalent is refused in one line: routers other than softmax top-k/GShard
(expert choice and Soft MoE mix tokens, hash/cosine/sinkhorn/aux-free route differently),
experts that are not bias-free SwiGLU, and dense FFNs with another activation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from moelab.moe.errors import ConfigError
from moelab.moe.experts import DenseFFN, GroupedExperts
from moelab.moe.layer import MoELayer
from moelab.moe.routers import GShardRouter, TopKRouter


def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError('exporting to Hugging Face needs transformers: pip install -e ".[export]"') from None
    if int(transformers.__version__.split(".")[0]) < 5:
        raise ConfigError(f"exporting needs transformers >= 5 (fused expert weights); this is {transformers.__version__}")
    return transformers


def rope_pairs_to_halves(weight_OD: Tensor, num_heads: int) -> Tensor:
    """Rows of a q or k projection reordered per head: even dimensions first, then odd ones
    (adjacent-pair RoPE → rotate-half RoPE)."""
    head_dim = weight_OD.shape[0] // num_heads
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return weight_OD.view(num_heads, head_dim, -1)[:, order].reshape(weight_OD.shape)


def _check_exportable(model: nn.Module) -> None:
    from moelab.models.lm import MoELM

    if not isinstance(model, MoELM):
        raise ConfigError(f"only language models export to Hugging Face; this checkpoint holds a {type(model).__name__}")
    for index, block in enumerate(model.blocks):
        if not hasattr(block.attn, "qkv"):
            raise ConfigError(f"block {index}'s attention is a mixture of attention heads (model.attention=moa): "
                              "Hugging Face's MoE models have standard attention")
        ffn = block.ffn
        if isinstance(ffn, DenseFFN):
            if ffn.activation != "swiglu" or ffn.b1_H is not None:
                raise ConfigError(f"block {index}'s dense FFN is {ffn.activation}{' with biases' if ffn.b1_H is not None else ''}: "
                                  "Qwen2-MoE's dense MLP is bias-free SwiGLU")
            continue
        router, experts = ffn.router, ffn.experts
        if type(router) not in (TopKRouter, GShardRouter) or getattr(router, "score", "softmax") != "softmax":
            raise ConfigError(f"MoE layer {index} routes with {type(router).__name__}: Hugging Face's MoE models route by "
                              "softmax top-k, so only router=topk (softmax) and router=gshard export")
        if getattr(router, "token_mask", None) is not None:
            raise ConfigError(f"MoE layer {index} has a token mask (MaskMoE): Hugging Face's routers have none")
        if type(experts) is not GroupedExperts or experts.activation != "swiglu" or experts.b1_EF is not None:
            raise ConfigError(f"MoE layer {index}'s experts are {type(experts).__name__} ({getattr(experts, 'activation', '?')}"
                              f"{', with biases' if getattr(experts, 'b1_EF', None) is not None else ''}): only bias-free "
                              "SwiGLU experts (expert=swiglu) map onto Hugging Face's")


def hf_config(model: nn.Module, config: Mapping[str, Any]):
    """The `Qwen2MoeConfig` of `model` (a MoELM)."""
    transformers = _require_transformers()
    moe = [block.ffn for block in model.blocks if isinstance(block.ffn, MoELayer)]
    attention = model.blocks[0].attn
    first = moe[0] if moe else None
    shared = first.shared_experts if first is not None else None
    kwargs = dict(
        vocab_size=model.vocab_size, hidden_size=model.d_model, intermediate_size=model.ffn_hidden,
        num_hidden_layers=model.depth, num_attention_heads=attention.num_heads, num_key_value_heads=attention.num_heads,
        hidden_act="silu", rms_norm_eps=model.final_norm.eps, tie_word_embeddings=model.head.weight is model.embed.weight,
        max_position_embeddings=int((config.get("data") or {}).get("seq_len") or 2048), attention_dropout=0.0,
        use_sliding_window=False, decoder_sparse_step=1,
        mlp_only_layers=[i for i, block in enumerate(model.blocks) if not isinstance(block.ffn, MoELayer)],
        num_experts=first.num_experts if first else 1,
        num_experts_per_tok=int(first.router.k) if first else 1,
        norm_topk_prob=bool(first.router.normalize) if first else True,
        moe_intermediate_size=first.experts.hidden if first else 8,
        shared_expert_intermediate_size=shared.w1_DH.shape[1] if shared is not None else 8,
        output_router_logits=False, rope_theta=attention.rope_base,
    )
    hf = transformers.Qwen2MoeConfig(**kwargs)
    hf.rope_parameters = {"rope_type": "default", "rope_theta": float(attention.rope_base)}
    for layer in moe:  # one config for all MoE layers: they must agree
        same = (layer.num_experts, int(layer.router.k), layer.experts.hidden) == (
            kwargs["num_experts"], kwargs["num_experts_per_tok"], kwargs["moe_intermediate_size"])
        if not same or (layer.shared_experts is None) != (shared is None):
            raise ConfigError("the MoE layers differ in experts, k or width: Qwen2-MoE has one setting for all layers")
    hf.architectures = ["Qwen2MoeForCausalLM"]
    return hf


@torch.no_grad()
def hf_state_dict(model: nn.Module, hf_model: nn.Module) -> dict[str, Tensor]:
    """`hf_model`'s state dict filled from `model` (every key of it, checked)."""
    state = {name: value.clone() for name, value in hf_model.state_dict().items()}
    heads, d = model.blocks[0].attn.num_heads, model.d_model
    put = _Putter(state)
    put("model.embed_tokens.weight", model.embed.weight)
    put("model.norm.weight", model.final_norm.weight)
    put("lm_head.weight", model.head.weight)
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        q, k, v = block.attn.qkv.weight.split(d)
        put(p + "self_attn.q_proj.weight", rope_pairs_to_halves(q, heads))
        put(p + "self_attn.k_proj.weight", rope_pairs_to_halves(k, heads))
        put(p + "self_attn.v_proj.weight", v)
        for name in ("q", "k", "v"):
            put(p + f"self_attn.{name}_proj.bias", torch.zeros(d))
        put(p + "self_attn.o_proj.weight", block.attn.proj.weight)
        put(p + "input_layernorm.weight", block.attn_norm.weight)
        put(p + "post_attention_layernorm.weight", block.ffn_norm.weight)
        ffn = block.ffn
        if isinstance(ffn, DenseFFN):
            put(p + "mlp.gate_proj.weight", ffn.w1_DH.t())
            put(p + "mlp.up_proj.weight", ffn.w3_DH.t())
            put(p + "mlp.down_proj.weight", ffn.w2_HD.t())
            continue
        experts = ffn.experts
        put(p + "mlp.gate.weight", ffn.router.gate.weight)
        put(p + "mlp.experts.gate_up_proj", torch.cat([experts.w1_EDF, experts.w3_EDF], dim=2).transpose(1, 2))
        put(p + "mlp.experts.down_proj", experts.w2_EFD.transpose(1, 2))
        shared = ffn.shared_experts
        put(p + "mlp.shared_expert_gate.weight", torch.zeros(1, d))  # sigmoid(0) = 0.5 on every token
        if shared is None:
            for name in ("gate_proj", "up_proj", "down_proj"):
                put(p + f"mlp.shared_expert.{name}.weight", torch.zeros_like(state[p + f"mlp.shared_expert.{name}.weight"]))
        else:
            put(p + "mlp.shared_expert.gate_proj.weight", shared.w1_DH.t())
            put(p + "mlp.shared_expert.up_proj.weight", shared.w3_DH.t())
            put(p + "mlp.shared_expert.down_proj.weight", 2 * shared.w2_HD.t())  # undoes the 0.5 gate
    missing = sorted(set(state) - put.done)
    if missing:
        raise RuntimeError(f"the export left Hugging Face weights unset: {missing[:5]}")
    return state


class _Putter:
    def __init__(self, state: dict[str, Tensor]) -> None:
        self.state, self.done = state, set()

    def __call__(self, name: str, value: Tensor) -> None:
        if name not in self.state:
            raise RuntimeError(f"Hugging Face's model has no weight {name}")
        if tuple(self.state[name].shape) != tuple(value.shape):
            raise RuntimeError(f"{name}: Hugging Face's shape {tuple(self.state[name].shape)}, moelab's {tuple(value.shape)}")
        self.state[name] = value.detach().to(self.state[name].dtype).contiguous().clone()
        self.done.add(name)


def export(path: str, out_dir: str | Path) -> Path:
    """Write the checkpoint's LM to `out_dir` in `save_pretrained` layout (config.json,
    model.safetensors); returns `out_dir`."""
    from moelab.tasks.checkpoint_io import model_from_state, read_model_state

    weights, config = read_model_state(str(path), "checkpoint")
    model = model_from_state(weights, config, "checkpoint", str(path)).float()
    _check_exportable(model)
    transformers = _require_transformers()
    hf_cfg = hf_config(model, config)
    tokenizer = hf_tokenizer(config, model.vocab_size)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        hf_cfg.eos_token_id = hf_cfg.pad_token_id = hf_cfg.bos_token_id = tokenizer.eos_token_id
    hf_model = transformers.Qwen2MoeForCausalLM(hf_cfg)
    hf_model.load_state_dict(hf_state_dict(model, hf_model))
    out_dir = Path(out_dir)
    hf_model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


END_OF_TEXT = "<|endoftext|>"


def hf_tokenizer(config: Mapping[str, Any], vocab_size: int):
    """The run's tokenizer as a `transformers` fast tokenizer, with end-of-text as eos and pad
    ids where the model's vocabulary has it, or None (a tiktoken encoding: transformers has
    its own copy under the model's name). Bytes: a byte-level BPE with no merges, byte b =
    id b and end-of-text 256 (not for the stdlib data's 256-id vocabulary, which has none),
    so `AutoTokenizer.from_pretrained(out_dir)` encodes text to its UTF-8 bytes as moelab did."""
    from moelab.use.generate import tokenizer_of

    transformers = _require_transformers()
    try:
        ours = tokenizer_of(config)
    except ConfigError:
        return None
    if ours.kind == "bytes":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from tokenizers.pre_tokenizers import ByteLevel

        alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins of GPT-2's byte-level BPE
        table = _bytes_to_unicode()
        assert sorted(alphabet) == sorted(table.values())
        vocab = {table[b]: b for b in range(256)}
        core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        core.decoder = decoders.ByteLevel()
        if vocab_size <= 256:
            return transformers.PreTrainedTokenizerFast(tokenizer_object=core)
        core.add_special_tokens([END_OF_TEXT])  # id 256
        return transformers.PreTrainedTokenizerFast(tokenizer_object=core, eos_token=END_OF_TEXT,
                                                    pad_token=END_OF_TEXT, bos_token=END_OF_TEXT)
    if ours.kind == "hf" and ours.name:
        fast = transformers.PreTrainedTokenizerFast(tokenizer_file=_tokenizer_file(ours.name))
        if ours.end_of_text is not None and ours.end_of_text < vocab_size:
            token = fast.convert_ids_to_tokens(ours.end_of_text)
            fast.eos_token = fast.pad_token = fast.bos_token = token
        return fast
    return None


def _tokenizer_file(name: str) -> str:
    path = Path(name).expanduser()
    return str(path / "tokenizer.json" if path.is_dir() else path)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to printable characters (Radford et al. 2019's encoder): the
    printable Latin-1 bytes stand for themselves, the others for code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table
