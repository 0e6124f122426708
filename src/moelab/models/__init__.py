"""Plain nn.Module backbones with MoE feed-forward layers."""
