"""A Vision Transformer from timm's blocks with MoE MLPs in chosen blocks (as in V-MoE)."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from moelab.models.placement import moe_layer_indices
from moelab.moe.errors import ConfigError
from moelab.moe.layer import MoELayer


class MoEViT(nn.Module):
    """timm's `VisionTransformer` whose MLP in blocks `moe_layer_indices(...)` is a MoELayer.

    The MoE layer replaces the block's MLP with the same width (`hidden = dim · mlp_ratio`
    per expert), so with top-k routing each token uses k times the dense MLP's FLOPs.
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
        for i in self.moe_indices:
            self.vit.blocks[i].mlp = MoELayer(
                d_model=embed_dim,
                hidden=hidden,
                router=router,
                experts=expert,
                aux_loss_weights=aux_loss_weights,
                layer_index=i,
            )
            if getattr(self.vit.blocks[i].mlp.router, "needs_token_ids", False):
                raise ConfigError("images have no token ids: use router=hash with router.key=position on the ViT")

    def forward(self, images: Tensor) -> Tensor:
        return self.vit(images)
