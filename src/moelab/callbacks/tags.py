"""The TensorBoard tag names the expert callbacks write: one place, so they stay stable.

Every name here is listed in the README section "What TensorBoard shows"; dashboards,
tests and sweep scripts build tags with these functions instead of spelling them out.
"""

from __future__ import annotations

# Per-layer scalars written on logging steps by ExpertUtilisation (and dead_experts by
# ExpertCollapseAlarm); `layer_scalar_tag(i, name)` gives `moe/layer<i>/<name>`.
UTILISATION_SCALARS = (
    "load_max_over_mean",
    "load_min_over_mean",
    "load_cv",
    "dropped_fraction",
    "unrouted_fraction",
    "router_entropy",
    "router_z",
)
DEAD_EXPERTS = "dead_experts"

LOAD_HEATMAP_TAG = "moe/load_heatmap"


def layer_scalar_tag(layer_index: int, name: str) -> str:
    """`moe/layer<i>/<name>`, e.g. `moe/layer3/load_cv`."""
    return f"moe/layer{layer_index}/{name}"


def tokens_per_expert_tag(layer_index: int) -> str:
    """Histogram, one bucket per expert: the tokens each expert processed in the logged step."""
    return f"moe/layer{layer_index}/tokens_per_expert"


def router_prob_share_tag(layer_index: int) -> str:
    """Histogram, one bucket per expert: the mean router probability of each expert (sums to 1)."""
    return f"moe/layer{layer_index}/router_prob_share"


def aux_loss_tag(layer_index: int, name: str) -> str:
    """Scalar: the layer's unweighted auxiliary loss `name` (balance, zloss, ...)."""
    return f"moe/layer{layer_index}/aux/{name}"


def specialisation_tag(layer_index: int, kind: str) -> str:
    """Image (or text for `top_tokens` and `top_classes`): `expert_class` (or, above 50
    classes, `top_classes`), `expert_position`, `expert_token_category`, `top_tokens`."""
    return f"moe/layer{layer_index}/{kind}"
