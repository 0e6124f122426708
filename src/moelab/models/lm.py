"""A decoder-only language model (pre-norm RMSNorm, RoPE, causal SDPA) with MoE FFNs in chosen blocks."""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.models.linear_cross_entropy import linear_cross_entropy
from moelab.models.placement import expert_width, moe_layer_indices
from moelab.moe.attention import MixtureOfAttention, apply_rope, rope_angles  # noqa: F401 - RoPE lives there
from moelab.moe.errors import ConfigError
from moelab.moe.experts import DenseFFN
from moelab.moe.layer import MoELayer
from moelab.moe.routed import active_parameters

INIT_STD = 0.02


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019, eq. 4): y = x / RMS(x) · g,
    RMS(x) = sqrt(mean_i x_i² + eps); no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x_float = x.float()
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE on queries and keys, through `scaled_dot_product_attention`."""

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0, rope_base: float = 10000.0) -> None:
        super().__init__()
        if d_model % num_heads or (d_model // num_heads) % 2:
            raise ConfigError(
                f"model.d_model={d_model} must split into model.num_heads={num_heads} heads of even size"
            )
        self.num_heads, self.head_dim, self.dropout, self.rope_base = num_heads, d_model // num_heads, dropout, rope_base
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x_BLD: Tensor) -> Tensor:
        batch, seq_len, d_model = x_BLD.shape
        q, k, v = self.qkv(x_BLD).view(batch, seq_len, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        cos_LH, sin_LH = rope_angles(seq_len, self.head_dim, self.rope_base, device=x_BLD.device)
        q, k = apply_rope(q, cos_LH, sin_LH), apply_rope(k, cos_LH, sin_LH)
        out_BHLD = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(out_BHLD.transpose(1, 2).reshape(batch, seq_len, d_model))


class DecoderBlock(nn.Module):
    """x + Attn(RMSNorm(x)), then + FFN(RMSNorm(x)); the FFN is dense or a MoELayer, the
    attention standard or a mixture of attention heads (`attn`, given)."""

    def __init__(self, d_model: int, num_heads: int, ffn: nn.Module, dropout: float, rope_base: float,
                 attn: nn.Module | None = None) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(d_model)
        self.attn = attn if attn is not None else CausalSelfAttention(d_model, num_heads, dropout, rope_base)
        self.ffn_norm = RMSNorm(d_model)
        self.ffn = ffn
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_BLD: Tensor, token_ids_BL: Tensor) -> Tensor:
        h_BLD = self.attn_norm(x_BLD)
        attended = self.attn(h_BLD, token_ids=token_ids_BL) if isinstance(self.attn, MixtureOfAttention) else self.attn(h_BLD)
        x_BLD = x_BLD + self.dropout(attended)
        h_BLD = self.ffn_norm(x_BLD)
        ffn_BLD = self.ffn(h_BLD, token_ids=token_ids_BL) if isinstance(self.ffn, MoELayer) else self.ffn(h_BLD)
        return x_BLD + self.dropout(ffn_BLD)


class MoELM(nn.Module):
    """Decoder-only transformer LM whose FFN in blocks `moe_layer_indices(depth, moe_every, moe_layers)`
    is a MoELayer (any router, expert and auxiliary loss of `moelab.moe`).

    A dense FFN has `ffn_hidden` units. `expert_hidden` sets each expert's width (see
    `moelab.models.expert_width`): "match" (default) sizes experts so a token's active
    expert units equal `ffn_hidden` (top-k: ffn_hidden / k each), so `moe_every=0` is the
    dense baseline with the same active FLOPs; "dense" makes every expert ffn_hidden wide;
    an integer sets it outright. Routers that hash token ids get `vocab_size`.

    Initialisation is GPT-2's (Radford et al. 2019): N(0, 0.02²) for embeddings and input
    projections, and N(0, (0.02 / sqrt(2·depth))²) for the projections that write into the
    residual stream (attention output, FFN W2). MoE layers start like the dense FFN they
    replace (MoELayer.reset_parameters).

    Every MoE layer must be causal-safe (a token's routing may depend only on that
    token); otherwise construction raises ConfigError.
    """

    def __init__(
        self,
        router: Callable[..., nn.Module],
        expert: Callable[..., nn.Module],
        aux_loss_weights: Mapping[str, float] | None = None,
        vocab_size: int = 256,
        d_model: int = 256,
        depth: int = 4,
        num_heads: int = 4,
        ffn_hidden: int = 768,
        ffn_activation: str = "swiglu",
        expert_hidden: int | str = "match",
        moe_every: int = 2,
        moe_layers: Sequence[int] | None = None,
        tie_embeddings: bool = True,
        dropout: float = 0.0,
        rope_base: float = 10000.0,
        attention: str = "standard",
        attention_experts: int = 8,
        attention_k: int = 2,
        attention_head_dim: int | str = "match",
    ) -> None:
        super().__init__()
        if attention not in ("standard", "moa"):
            raise ConfigError(f"model.attention={attention!r}: pick standard or moa (mixture of attention heads)")
        if vocab_size < 2:
            raise ConfigError(f"model.vocab_size={vocab_size} must be >= 2: set it from the data (data.vocab_size)")
        width, match = expert_width(expert_hidden, ffn_hidden)
        self.vocab_size, self.d_model, self.depth = vocab_size, d_model, depth
        self.ffn_hidden = ffn_hidden
        self.moe_indices = moe_layer_indices(depth, moe_every, moe_layers)
        self.embed = nn.Embedding(vocab_size, d_model)
        blocks = []
        for i in range(depth):
            if i in self.moe_indices:
                ffn = MoELayer(
                    d_model,
                    width,
                    router=router,
                    experts=expert,
                    aux_loss_weights=aux_loss_weights,
                    layer_index=i,
                    match_dense_flops=match,
                    router_facts={"vocab_size": vocab_size},
                )
            else:
                ffn = DenseFFN(d_model, ffn_hidden, ffn_activation)
            attn = None
            if attention == "moa":  # MoA (Zhang et al. 2022) in every block, routed like the FFN experts
                attn = MixtureOfAttention(d_model, router, attention_experts, attention_k, attention_head_dim, causal=True,
                                          rope_base=rope_base, aux_loss_weights=aux_loss_weights, layer_index=i,
                                          router_facts={"vocab_size": vocab_size}, dropout=dropout)
            blocks.append(DecoderBlock(d_model, num_heads, ffn, dropout, rope_base, attn))
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self._init_weights()
        if tie_embeddings:
            self.head.weight = self.embed.weight
        self._check_causal_safety()

    def _init_weights(self) -> None:
        # GPT-2 (Radford et al. 2019): N(0, 0.02²), and residual-stream output projections
        # scaled by 1/sqrt(2·depth) (two per block: attention and FFN).
        out_std = INIT_STD / math.sqrt(2 * self.depth)
        nn.init.normal_(self.embed.weight, std=INIT_STD)
        nn.init.normal_(self.head.weight, std=INIT_STD)
        for block in self.blocks:
            if isinstance(block.attn, MixtureOfAttention):
                block.attn.reset_parameters(in_std=INIT_STD, out_std=out_std)
            else:
                nn.init.normal_(block.attn.qkv.weight, std=INIT_STD)
                nn.init.normal_(block.attn.proj.weight, std=out_std)
            if isinstance(block.ffn, MoELayer):
                block.ffn.reset_parameters(in_std=INIT_STD, out_std=out_std, dense_hidden=self.ffn_hidden)
            else:
                block.ffn.reset_parameters(in_std=INIT_STD, out_std=out_std)

    def _check_causal_safety(self) -> None:
        for block in self.blocks:
            for part in (block.ffn, block.attn):
                if not isinstance(part, (MoELayer, MixtureOfAttention)) or part.causal_safe:
                    continue
                router = part.router
                where = "MoE layer" if isinstance(part, MoELayer) else "attention-head mixture of block"
                raise ConfigError(
                    f"model=lm: the router of {where} {part.layer_index} ({type(router).__name__}: "
                    f"{router.extra_repr()}) routes a token depending on other tokens of the batch, so future "
                    "tokens would leak into earlier positions of the causal LM: pick a per-token router, "
                    "e.g. router=topk without capacity_factor (router.capacity_factor=null router.eval_capacity_factor=null)"
                )

    def forward(self, token_ids_BL: Tensor, targets_BL: Tensor | None = None) -> Tensor:
        """Next-token logits (B, L, V) for token ids (B, L); with `targets_BL`, instead the mean
        next-token cross-entropy, computed with the head in row chunks so that the (B·L, V)
        logits never exist whole (moelab.models.linear_cross_entropy). Inside `forward`, so
        that FSDP has the head's weight gathered."""
        x_BLD = self.embed(token_ids_BL)
        for block in self.blocks:
            x_BLD = block(x_BLD, token_ids_BL)
        h_BLD = self.final_norm(x_BLD)
        if targets_BL is not None:
            return linear_cross_entropy(h_BLD.flatten(0, 1), self.head.weight, targets_BL.flatten())
        return self.head(h_BLD)

    @torch.no_grad()
    def generate(
        self,
        prompt_BL: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        max_context: int | None = None,
        on_token: Callable[[Tensor], None] | None = None,
        top_p: float | None = None,
    ) -> Tensor:
        """Sample `max_new_tokens` continuations (no KV cache: each step re-runs the context,
        cropped to `max_context` tokens). Sampling draws from `generator` (on the CPU), so a
        fixed generator gives a fixed continuation. `top_k` keeps the k likeliest tokens;
        `top_p` (nucleus sampling, Holtzman et al. 2020) the fewest likeliest tokens whose
        probabilities add up to at least p (after top-k and temperature). `on_token(next_B)`
        is called after each step, while the MoE layers' `last_plan` still describe that
        step's forward."""
        tokens = prompt_BL
        for _ in range(max_new_tokens):
            context = tokens if max_context is None else tokens[:, -max_context:]
            logits_BV = self(context)[:, -1].float().cpu()
            if temperature <= 0:
                next_B1 = logits_BV.argmax(-1, keepdim=True)
            else:
                logits_BV = logits_BV / temperature
                if top_k is not None:
                    kth = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
                    logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
                if top_p is not None:
                    logits_BV = nucleus(logits_BV, top_p)
                next_B1 = torch.multinomial(logits_BV.softmax(-1), 1, generator=generator)
            tokens = torch.cat((tokens, next_B1.to(tokens.device)), dim=1)
            if on_token is not None:
                on_token(next_B1[:, 0])
        return tokens

    def num_parameters(self, active: bool = False) -> int:
        """Parameter count; `active=True` counts, for MoE layers, only the share of expert
        weights one token uses (see moelab.moe.layer.active_parameters)."""
        return active_parameters(self) if active else sum(param.numel() for param in self.parameters())


def nucleus(logits_BV: Tensor, top_p: float) -> Tensor:
    """Logits with every token outside the nucleus at −inf: sorted by probability, a token is
    kept if the tokens before it add up to less than `top_p` (so the likeliest always is)."""
    probs_BV = logits_BV.softmax(-1)
    sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
    before_BV = sorted_BV.cumsum(-1) - sorted_BV
    drop_BV = torch.zeros_like(probs_BV, dtype=torch.bool).scatter(-1, order_BV, before_BV >= top_p)
    return logits_BV.masked_fill(drop_BV, float("-inf"))
