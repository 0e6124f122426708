"""A Vision Transformer from timm's blocks with MoE MLPs in chosen blocks (as in V-MoE)."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from moelab.models.placement import expert_width, moe_layer_indices
from moelab.moe.attention import MixtureOfAttention
from moelab.moe.errors import ConfigError
from moelab.moe.layer import MoELayer
from moelab.moe.lifecycle.upcycle import DenseWeights, upcycle_layer


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
        moe_last: int | None = None,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        expert_hidden: int | str = "match",
        timm_name: str | None = None,
        pretrained: bool = False,
        attention: str = "standard",
        attention_experts: int = 8,
        attention_k: int = 2,
        attention_head_dim: int | str = "match",
    ) -> None:
        super().__init__()
        if attention not in ("standard", "moa"):
            raise ConfigError(f"model.attention={attention!r}: pick standard or moa (mixture of attention heads)")
        if timm_name:
            self.vit = timm_vision_transformer(timm_name, pretrained, img_size, in_chans, num_classes, drop_rate)
            depth, embed_dim = len(self.vit.blocks), self.vit.embed_dim
        else:
            if pretrained:
                raise ConfigError("model.pretrained=true loads timm's weights: name the model with model.timm_name=<name>")
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
        self.moe_indices = moe_layer_indices(depth, moe_every, moe_layers, moe_last)
        for i in self.moe_indices:
            dense = timm_mlp_weights(self.vit.blocks[i].mlp, i)
            hidden = dense.hidden
            width, match = expert_width(expert_hidden, hidden)
            layer = MoELayer(
                d_model=embed_dim,
                hidden=width,
                router=router,
                experts=expert,
                aux_loss_weights=aux_loss_weights,
                layer_index=i,
                match_dense_flops=match,
                dense_activation="gelu",  # timm's Mlp: experts match its FLOPs, not its width
                router_facts={"num_positions": self.num_patches + self.vit.num_prefix_tokens},
            )
            layer.reset_parameters(in_std=TIMM_INIT_STD, out_std=TIMM_INIT_STD, dense_hidden=hidden)
            if pretrained:  # sparse upcycling of the pretrained MLP (Komatsuzaki et al. 2023)
                upcycle_layer(layer, dense)
            self.vit.blocks[i].mlp = layer
            if getattr(self.vit.blocks[i].mlp.router, "needs_token_ids", False):
                raise ConfigError("images have no token ids: use router=hash with router.key=position on the ViT")

        if attention == "moa":  # MoA (Zhang et al. 2022) in every block, routed like the FFN experts
            for i, block in enumerate(self.vit.blocks):
                block.attn = MixtureOfAttention(
                    embed_dim, router, attention_experts, attention_k, attention_head_dim, causal=False,
                    aux_loss_weights=aux_loss_weights, layer_index=i,
                    router_facts={"num_positions": self.num_patches + self.vit.num_prefix_tokens},
                )
                block.attn.reset_parameters(in_std=TIMM_INIT_STD, out_std=TIMM_INIT_STD)

    def forward(self, images: Tensor) -> Tensor:
        return self.vit(images)


def timm_vision_transformer(name: str, pretrained: bool, img_size: int, in_chans: int, num_classes: int,
                            drop_rate: float) -> nn.Module:
    """Any timm vision transformer with `blocks[i].mlp` (ViT, DeiT, EVA, ...) at this data's
    image size, channels and classes; one-line errors for an unknown name, a model without
    blocks, or pretrained weights that cannot be fetched."""
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"model.timm_name={name} is not a timm model: list them with timm.list_models('vit_*')")
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, img_size=img_size,
                                  in_chans=in_chans, drop_rate=drop_rate)
    except TypeError as exc:
        raise ConfigError(f"model.timm_name={name} does not take an image size and channels ({exc}): "
                          "pick a vision transformer (vit_*, deit_*, eva*)") from exc
    except Exception as exc:  # noqa: BLE001 - hub and network errors come in many types
        if not pretrained:
            raise
        raise ConfigError(f"model.pretrained=true: {name}'s weights could not be loaded ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:160] if str(exc) else 'no message'}); without internet, put them "
                          "in the Hugging Face cache first, or train from scratch with model.pretrained=false") from exc
    if not isinstance(getattr(model, "blocks", None), nn.Sequential) or not hasattr(model.blocks[0], "mlp"):
        raise ConfigError(f"model.timm_name={name} has no blocks[i].mlp to replace: pick a vision transformer")
    return model


def timm_mlp_weights(mlp: nn.Module, index: int) -> DenseWeights:
    """A timm block's MLP in moelab's layout: `Mlp` (fc1, act, fc2) or `SwiGLU` (fc1_g
    activated, fc1_x, fc2). Refuses MLPs with an inner norm or another shape in one line."""
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        raise ConfigError(f"block {index}'s MLP normalises its hidden units ({type(mlp.norm).__name__}); moelab's experts "
                          "have no such norm: pick a model without scale_mlp")
    if hasattr(mlp, "fc1_g") and hasattr(mlp, "fc1_x"):
        # moelab's gated experts compute act(x W1) * (x W3): W1 is timm's fc1_g, W3 its fc1_x.
        return DenseWeights(mlp.fc1_g.weight.t(), mlp.fc2.weight.t(), mlp.fc1_x.weight.t(),
                            _bias(mlp.fc1_g), _bias(mlp.fc2), _bias(mlp.fc1_x))
    if hasattr(mlp, "fc1") and hasattr(mlp, "fc2") and not type(mlp).__name__.startswith("Glu"):
        return DenseWeights(mlp.fc1.weight.t(), mlp.fc2.weight.t(), None, _bias(mlp.fc1), _bias(mlp.fc2))
    raise ConfigError(f"block {index}'s MLP is a {type(mlp).__name__}: moelab replaces timm's Mlp and SwiGLU")


def _bias(linear: nn.Module) -> Tensor | None:
    return None if getattr(linear, "bias", None) is None else linear.bias
