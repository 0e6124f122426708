"""A Vision Transformer from timm's blocks with MoE MLPs in chosen blocks (as in V-MoE)."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from moelab.models.placement import expert_width, moe_layer_indices
from moelab.moe.errors import ConfigError
from moelab.moe.layer import MoELayer


# timm's VisionTransformer draws its Linear weights from a truncated normal of std 0.02.
TIMM_INIT_STD = 0.02


class MoEViT(nn.Module):
    """timm's `VisionTransformer` whose MLP in blocks `moe_layer_indices(...)` is a MoELayer.

    `expert_hidden` sets each expert's width (see `moelab.models.expert_width`):
    "match" (default) sizes experts so a token's active expert units equal the dense MLP's
    H = embed_dim · mlp_ratio (top-k: H / k each), so `model.moe_every=0` is the dense twin
    with the same active FLOPs; "dense" gives every expert the dense MLP's width (V-MoE's
    convention: top-k costs k times the dense MLP); an integer sets it outright.

    Experts start like timm's MLP: N(0, 0.02²) input weights, output weights scaled so
    the MoE output has the dense MLP's RMS (MoELayer.reset_parameters). Routers that hash
    positions get `num_positions` (patches, plus the class token if any).
    """

    def __init__(
        self,
        router: Callable[..., nn.Module],
        expert: Callable[..., nn.Module],
        aux_loss_weights: Mapping[str, float] | None = None,
        img_size: int = 8,
        patch_size: int = 2,
        in_chans: int = 1,
        num_classes: int = 10,
        embed_dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        moe_every: int = 2,
        moe_layers: Sequence[int] | None = None,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        expert_hidden: int | str = "match",
    ) -> None:
        super().__init__()
        self.vit = VisionTransformer(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            drop_rate=drop_rate,
            global_pool=global_pool,
            class_token=global_pool == "token",
        )
        self.num_classes = num_classes
        self.num_patches = self.vit.patch_embed.num_patches
        self.moe_indices = moe_layer_indices(depth, moe_every, moe_layers)
        hidden = int(embed_dim * mlp_ratio)
        width, match = expert_width(expert_hidden, hidden)
        for i in self.moe_indices:
            layer = MoELayer(
                d_model=embed_dim,
                hidden=width,
                router=router,
                experts=expert,
                aux_loss_weights=aux_loss_weights,
                layer_index=i,
                match_dense_flops=match,
                router_facts={"num_positions": self.num_patches + self.vit.num_prefix_tokens},
            )
            layer.reset_parameters(in_std=TIMM_INIT_STD, out_std=TIMM_INIT_STD, dense_hidden=hidden)
            self.vit.blocks[i].mlp = layer
            if getattr(self.vit.blocks[i].mlp.router, "needs_token_ids", False):
                raise ConfigError("images have no token ids: use router=hash with router.key=position on the ViT")

    def forward(self, images: Tensor) -> Tensor:
        return self.vit(images)
