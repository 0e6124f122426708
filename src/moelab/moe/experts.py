"""Routed experts with weights stored as (E, …) tensors and computed by grouped matmuls,
plus optional always-on shared experts (DeepSeekMoE)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from moelab.moe.dispatch import grouped_mm
from moelab.moe.errors import ConfigError, check_num_experts

ACTIVATIONS = ("gelu", "swiglu", "geglu")


def local_part(weight: Tensor) -> Tensor:
    """This rank's experts of a weight stack: the local shard of a DTensor split over an
    expert-parallel mesh (see moelab.parallel), or the tensor itself."""
    return weight.to_local() if isinstance(weight, DTensor) else weight


def _activate(activation: str, h_NF: Tensor, gate_NF: Tensor | None) -> Tensor:
    if activation == "gelu":
        return F.gelu(h_NF)
    if activation == "swiglu":
        return F.silu(h_NF) * gate_NF
    return F.gelu(h_NF) * gate_NF


class GroupedExperts(nn.Module):
    """E feed-forward experts evaluated in one grouped matmul per weight.

    mlp (`activation="gelu"`): f_e(x) = W2_e · GELU(W1_e x)
    swiglu: f_e(x) = W2_e · (SiLU(W1_e x) ⊙ W3_e x); geglu: GELU in place of SiLU (Shazeer 2020).

    `granularity` m (DeepSeekMoE, Dai et al. 2024) splits each of the `num_experts`
    experts into m experts of hidden size `hidden / m`: E·m experts in all.
    `num_shared` s adds that many always-on experts of the same (fine) size, applied to
    every token and added to the routed output: y = Σ_shared f_s(x) + Σ_{i∈TopK} g_i f_i(x).
    MoELayer routes each token to k·m − s fine experts, so k·m are active in all: the
    active parameters of k coarse experts.
    `dropout` acts on the hidden activations. `bias` adds per-expert biases to both
    projections, as timm's MLP and V-MoE's experts have (upcycling a ViT copies them).

    Input rows arrive grouped by expert with `group_sizes_E` rows for expert e. With
    `kernel="triton"` (SwiGLU and GeGLU experts without biases, on a GPU) the layer hands
    over the tokens and each row's token instead, and the gather, the gate and up matmuls
    and the GLU product run as one Triton kernel (moelab.moe.kernels).
    """

    def __init__(
        self,
        d_model: int,
        hidden: int,
        num_experts: int,
        activation: str = "gelu",
        granularity: int = 1,
        num_shared: int = 0,
        dropout: float = 0.0,
        bias: bool = False,
        kernel: str = "torch",
    ) -> None:
        super().__init__()
        check_num_experts(num_experts)
        if kernel not in ("torch", "triton"):
            raise ConfigError(f"expert.kernel={kernel} must be torch or triton")
        if kernel == "triton" and (activation not in ("swiglu", "geglu") or bias):
            raise ConfigError(f"expert.kernel=triton fuses the gate and up matmuls of SwiGLU and GeGLU experts without "
                              f"biases, not activation={activation}, bias={bias}: use expert.kernel=torch")
        if activation not in ACTIVATIONS:
            raise ConfigError(f"expert.activation='{activation}' is unknown: pick one of {', '.join(ACTIVATIONS)}")
        if granularity < 1 or hidden % granularity:
            raise ConfigError(
                f"expert.granularity={granularity} must be >= 1 and divide the expert hidden size {hidden}"
            )
        if num_shared < 0:
            raise ConfigError(f"expert.num_shared={num_shared} must be >= 0")
        fine_hidden = hidden // granularity
        # Grouped matmul needs 16-byte aligned rows: multiples of 8 cover bf16 and fp32.
        if d_model % 8 or fine_hidden % 8:
            raise ConfigError(
                f"grouped experts need d_model ({d_model}) and hidden/granularity ({fine_hidden}) divisible by 8"
            )
        self.num_experts = num_experts * granularity
        self.granularity, self.num_shared = granularity, num_shared
        self.d_model, self.hidden, self.activation = d_model, fine_hidden, activation
        self.kernel = kernel
        gated = activation != "gelu"
        E = self.num_experts
        self.w1_EDF = nn.Parameter(torch.empty(E, d_model, fine_hidden))
        self.w3_EDF = nn.Parameter(torch.empty(E, d_model, fine_hidden)) if gated else None
        self.w2_EFD = nn.Parameter(torch.empty(E, fine_hidden, d_model))
        self.b1_EF = nn.Parameter(torch.zeros(E, fine_hidden)) if bias else None
        self.b3_EF = nn.Parameter(torch.zeros(E, fine_hidden)) if bias and gated else None
        self.b2_ED = nn.Parameter(torch.zeros(E, d_model)) if bias else None
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, in_std: float | None = None, out_std: float | None = None) -> None:
        """W1 (and W3) ~ N(0, in_std²), W2 ~ N(0, out_std²); by default each expert's own
        fan-in, d^-1/2 and f^-1/2; biases 0. MoELayer.reset_parameters sets them so the
        layer starts like the dense FFN it replaces."""
        for w in (self.w1_EDF, self.w3_EDF):
            if w is not None:
                nn.init.normal_(w, std=self.d_model**-0.5 if in_std is None else in_std)
        nn.init.normal_(self.w2_EFD, std=self.hidden**-0.5 if out_std is None else out_std)
        for b in (self.b1_EF, self.b3_EF, self.b2_ED):
            if b is not None:
                b.zero_()

    @property
    def gathers_tokens(self) -> bool:
        """Whether forward takes the (T, D) tokens and each row's token (the fused kernel)."""
        return self.kernel == "triton"

    def forward(self, x_ND: Tensor, group_sizes_E: Tensor | None, merge_GE: Tensor | None = None,
                per_token: bool = False, token_index_N: Tensor | None = None) -> Tensor:
        """Routed experts on grouped rows (under expert parallelism: this rank's experts); with
        `token_index_N`, the rows are those tokens of the (T, D) `x_ND` (the Triton kernel
        gathers them); with `merge_GE`, SMEAR's FFN of merged parameters on the (T, D) tokens
        (`merged_forward`). All through this call, so FSDP gathers the weights first."""
        if merge_GE is not None:
            return self.merged_forward(x_ND, merge_GE, per_token)
        if token_index_N is not None:
            return self._fused_forward(x_ND, token_index_N, group_sizes_E)
        offsets_E = torch.cumsum(group_sizes_E, 0, dtype=torch.int32)
        h_NF = grouped_mm(x_ND, local_part(self.w1_EDF), offsets_E)
        gate_NF = None if self.w3_EDF is None else grouped_mm(x_ND, local_part(self.w3_EDF), offsets_E)
        if self.b1_EF is None:
            return grouped_mm(self.dropout(_activate(self.activation, h_NF, gate_NF)), local_part(self.w2_EFD), offsets_E)
        # Each row's expert (static output size: no host sync), to pick its biases.
        experts_E = torch.arange(group_sizes_E.numel(), device=x_ND.device)
        expert_N = torch.repeat_interleave(experts_E, group_sizes_E, output_size=x_ND.shape[0])
        h_NF = h_NF + local_part(self.b1_EF)[expert_N].to(h_NF.dtype)
        if gate_NF is not None:
            gate_NF = gate_NF + local_part(self.b3_EF)[expert_N].to(gate_NF.dtype)
        y_ND = grouped_mm(self.dropout(_activate(self.activation, h_NF, gate_NF)), local_part(self.w2_EFD), offsets_E)
        return y_ND + local_part(self.b2_ED)[expert_N].to(y_ND.dtype)

    def _fused_forward(self, x_TD: Tensor, token_index_N: Tensor, group_sizes_E: Tensor) -> Tensor:
        from moelab.moe import kernels

        if not kernels.available(x_TD):
            raise ConfigError("expert.kernel=triton runs on a CUDA GPU with triton installed (on the CPU only under "
                              "TRITON_INTERPRET=1, for tests): use expert.kernel=torch here")
        device_type = x_TD.device.type
        if torch.is_autocast_enabled(device_type):
            x_TD = x_TD.to(torch.get_autocast_dtype(device_type))
        a_NF = kernels.gather_gate_up(x_TD, token_index_N, group_sizes_E, local_part(self.w1_EDF),
                                      local_part(self.w3_EDF), self.activation)
        offsets_E = torch.cumsum(group_sizes_E, 0, dtype=torch.int32)
        return grouped_mm(self.dropout(a_NF), local_part(self.w2_EFD), offsets_E)

    def merged_forward(self, x_TD: Tensor, merge_GE: Tensor, per_token: bool) -> Tensor:
        """One FFN per group whose parameters are the experts' merged with weights p (SMEAR,
        Muqeeth et al. 2023): W̄_g = Σ_i p_{g,i} W_i for W1, W3, W2 and the biases.

        Per sequence (G = B groups of the T tokens, in order) the merged weights are formed
        and applied by batched matmuls. Per token (G = T) forming T merged matrices would
        take T·D·F memory; the same numbers come from x W̄ = Σ_i p_i (x W_i), since every
        merged matrix is applied linearly: each projection runs for all experts and is then
        mixed by p, the activation applied to the mixed pre-activation, as the merged FFN does.
        """
        if torch.is_autocast_enabled(x_TD.device.type):
            x_TD = x_TD.to(torch.get_autocast_dtype(x_TD.device.type))
        dtype = x_TD.dtype
        p_GE = merge_GE.to(dtype)
        weights = {name: local_part(w).to(dtype) for name, w in self.expert_weights().items()}
        if weights["w1_EDF"].shape[0] != p_GE.shape[1]:
            raise ConfigError("router=smear merges every expert: it needs all experts on each rank (ep=1)")

        def project(x_G_or_T: Tensor, weight: str, bias: str) -> Tensor:
            w = weights[weight]
            if per_token:
                out = torch.einsum("ti,te,eio->to", x_G_or_T, p_GE, w)
            else:
                out = torch.bmm(x_G_or_T, torch.einsum("ge,eio->gio", p_GE, w))
            if bias in weights:
                b = p_GE @ weights[bias]
                out = out + (b if per_token else b.unsqueeze(1))
            return out

        x = x_TD if per_token else x_TD.reshape(p_GE.shape[0], -1, x_TD.shape[-1])
        h = project(x, "w1_EDF", "b1_EF")
        gate = project(x, "w3_EDF", "b3_EF") if "w3_EDF" in weights else None
        y = project(self.dropout(_activate(self.activation, h, gate)), "w2_EFD", "b2_ED")
        return y.reshape(x_TD.shape)

    def expert_weights(self) -> dict[str, nn.Parameter]:
        """The (E, …) weight and bias stacks, by attribute name: what expert parallelism splits."""
        names = ("w1_EDF", "w3_EDF", "w2_EFD", "b1_EF", "b3_EF", "b2_ED")
        return {name: w for name in names if (w := getattr(self, name)) is not None}

    def make_shared_experts(self) -> "DenseFFN | None":
        """The always-on shared experts this config asks for (a separate dense module, so
        sharding treats them like any dense layer), or None."""
        if not self.num_shared:
            return None
        return DenseFFN(self.d_model, self.num_shared * self.hidden, self.activation, self.dropout.p, self.b1_EF is not None)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, d_model={self.d_model}, hidden={self.hidden}, activation={self.activation}, "
            f"granularity={self.granularity}, num_shared={self.num_shared}, bias={self.b1_EF is not None}"
        )


class DenseFFN(nn.Module):
    """One dense feed-forward network with the experts' activations and initialisation:
    the dense FFN of a model's non-MoE blocks (so dense and MoE start alike), and the
    shared experts of DeepSeekMoE (Dai et al. 2024): n always-on experts of hidden size F
    computed together as one FFN of hidden n·F on every token."""

    def __init__(self, d_model: int, hidden: int, activation: str = "gelu", dropout: float = 0.0, bias: bool = False) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"FFN activation '{activation}' is unknown: pick one of {', '.join(ACTIVATIONS)}")
        self.activation = activation
        gated = activation != "gelu"
        self.w1_DH = nn.Parameter(torch.empty(d_model, hidden))
        self.w3_DH = nn.Parameter(torch.empty(d_model, hidden)) if gated else None
        self.w2_HD = nn.Parameter(torch.empty(hidden, d_model))
        self.b1_H = nn.Parameter(torch.zeros(hidden)) if bias else None
        self.b3_H = nn.Parameter(torch.zeros(hidden)) if bias and gated else None
        self.b2_D = nn.Parameter(torch.zeros(d_model)) if bias else None
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, in_std: float | None = None, out_std: float | None = None) -> None:
        """W1 (and W3) ~ N(0, in_std²), W2 ~ N(0, out_std²); by default fan-in, d^-1/2 and H^-1/2; biases 0."""
        d_model, hidden = self.w1_DH.shape
        for w in (self.w1_DH, self.w3_DH):
            if w is not None:
                nn.init.normal_(w, std=d_model**-0.5 if in_std is None else in_std)
        nn.init.normal_(self.w2_HD, std=hidden**-0.5 if out_std is None else out_std)
        for b in (self.b1_H, self.b3_H, self.b2_D):
            if b is not None:
                b.zero_()

    def forward(self, x_TD: Tensor) -> Tensor:
        h_TH, gate_TH = x_TD @ self.w1_DH, None if self.w3_DH is None else x_TD @ self.w3_DH
        if self.b1_H is None:
            return self.dropout(_activate(self.activation, h_TH, gate_TH)) @ self.w2_HD
        gate_TH = None if gate_TH is None else gate_TH + self.b3_H
        return self.dropout(_activate(self.activation, h_TH + self.b1_H, gate_TH)) @ self.w2_HD + self.b2_D


class LoRAExperts(nn.Module):
    """E experts that share one dense FFN and differ by low-rank adapters (LoRA-MoE).

    Expert e computes the base FFN with every projection W replaced by W + (α/r)·A_e B_e
    (Hu et al. 2021's LoRA, one adapter per expert per projection, as in the LoRA-MoE
    mixtures of the seed documents):
        h = x W1 + (α/r) (x A1_e) B1_e,   likewise W3 for gated activations,
        y = a W2 + (α/r) (a A2_e) B2_e,   a = act(h[, gate]).
    The base is one dense matmul over all rows; the adapters are grouped matmuls over the
    rows grouped by expert, so the routers, dispatch and statistics serve them unchanged.
    B starts at zero, so at initialisation every expert is the base FFN and a router whose
    weights sum to 1 gives exactly the base FFN. `train_base=False` freezes the base (only
    adapters and router train). Rank r must be a multiple of 8 (grouped matmul alignment).
    """

    granularity = 1
    num_shared = 0
    shared_base = True  # every expert is the base FFN at init: MoELayer initialises the base like one FFN

    def __init__(self, d_model: int, hidden: int, num_experts: int, activation: str = "swiglu", rank: int = 8,
                 alpha: float = 16.0, train_base: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        check_num_experts(num_experts)
        if not isinstance(rank, int) or rank < 8 or rank % 8:
            raise ConfigError(f"expert.rank={rank} must be a multiple of 8 (grouped matmul rows are 16-byte aligned)")
        if d_model % 8 or hidden % 8:
            raise ConfigError(f"LoRA experts need d_model ({d_model}) and hidden ({hidden}) divisible by 8")
        self.num_experts, self.d_model, self.hidden, self.rank = num_experts, d_model, hidden, rank
        self.scale = float(alpha) / rank
        self.base = DenseFFN(d_model, hidden, activation, dropout)
        self.activation = activation
        E, gated = num_experts, activation != "gelu"
        self.a1_EDR, self.b1_ERF = nn.Parameter(torch.empty(E, d_model, rank)), nn.Parameter(torch.empty(E, rank, hidden))
        self.a3_EDR = nn.Parameter(torch.empty(E, d_model, rank)) if gated else None
        self.b3_ERF = nn.Parameter(torch.empty(E, rank, hidden)) if gated else None
        self.a2_EFR, self.b2_ERD = nn.Parameter(torch.empty(E, hidden, rank)), nn.Parameter(torch.empty(E, rank, d_model))
        self.train_base = train_base
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, in_std: float | None = None, out_std: float | None = None) -> None:
        """The base like a DenseFFN (in_std, out_std); adapters A ~ N(0, 1/fan-in), B = 0."""
        self.base.reset_parameters(in_std, out_std)
        for a, fan_in in ((self.a1_EDR, self.d_model), (self.a3_EDR, self.d_model), (self.a2_EFR, self.hidden)):
            if a is not None:
                nn.init.normal_(a, std=fan_in**-0.5)
        for b in (self.b1_ERF, self.b3_ERF, self.b2_ERD):
            if b is not None:
                b.zero_()
        for p in self.base.parameters():
            p.requires_grad_(self.train_base)

    def _adapter(self, x_NI: Tensor, a_EIR: Tensor, b_ERO: Tensor, offsets_E: Tensor) -> Tensor:
        return self.scale * grouped_mm(grouped_mm(x_NI, local_part(a_EIR), offsets_E), local_part(b_ERO), offsets_E)

    def forward(self, x_ND: Tensor, group_sizes_E: Tensor) -> Tensor:
        offsets_E = torch.cumsum(group_sizes_E, 0, dtype=torch.int32)
        base = self.base
        h_NF = x_ND @ base.w1_DH.to(x_ND.dtype)
        h_NF = h_NF + self._adapter(x_ND, self.a1_EDR, self.b1_ERF, offsets_E).to(h_NF.dtype)
        gate_NF = None
        if base.w3_DH is not None:
            gate_NF = x_ND @ base.w3_DH.to(x_ND.dtype)
            gate_NF = gate_NF + self._adapter(x_ND, self.a3_EDR, self.b3_ERF, offsets_E).to(gate_NF.dtype)
        a_NF = base.dropout(_activate(self.activation, h_NF, gate_NF))
        y_ND = a_NF @ base.w2_HD.to(a_NF.dtype)
        return y_ND + self._adapter(a_NF, self.a2_EFR, self.b2_ERD, offsets_E).to(y_ND.dtype)

    def expert_weights(self) -> dict[str, nn.Parameter]:
        """The per-expert adapter stacks (what expert parallelism splits); the base is dense."""
        names = ("a1_EDR", "b1_ERF", "a3_EDR", "b3_ERF", "a2_EFR", "b2_ERD")
        return {name: w for name in names if (w := getattr(self, name)) is not None}

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, d_model={self.d_model}, hidden={self.hidden}, rank={self.rank}, "
                f"scale={self.scale}, train_base={self.train_base}")
