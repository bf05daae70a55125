"""The FD_DINOv2 detector: facebookresearch/dinov2's ViT (``dinov2_vitl14`` for the paper's numbers)
as EDM2's ``calculate_metrics.py`` runs it, built with timm from the official weight file.

Input uint8 images [N, 3, H, W]; output the class token after the final norm [N, D] float32 (1024
for ViT-L/14): ``interpolate(x.float(), 224, bicubic, antialias=True)``, ``/ 255``, ImageNet mean and
std, the network. DINOv2 stores position embeddings for a 37 x 37 grid and resizes them at run time
with ``scale_factor = (16 + 0.1) / 37`` (bicubic, no antialias: its ``interpolate_offset``); timm's
own loading resizes them another way (antialiased, to a size), which changes the features by about
4e-2. Here the 16 x 16 embedding is computed the official way once, before the weights go into
timm's model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DINOv2", "official_pos_embed"]

RESOLUTION = 224
PATCH = 14
INTERPOLATE_OFFSET = 0.1
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def official_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """DINOv2's ``interpolate_pos_encoding`` for a square ``grid`` of patches: [1, 1 + M*M, D] ->
    [1, 1 + grid*grid, D] (bicubic with ``scale_factor (grid + 0.1) / M``, no antialias, float32)."""
    dtype = pos_embed.dtype
    pos = pos_embed.float()
    n = pos.shape[1] - 1
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"pos_embed must hold 1 + M*M tokens, got {pos.shape[1]}")
    if m == grid:
        return pos_embed
    scale = float(grid + INTERPOLATE_OFFSET) / m
    patch = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, mode="bicubic", antialias=False, scale_factor=(scale, scale))
    if patch.shape[-2:] != (grid, grid):
        raise ValueError(f"pos_embed of {m}x{m} does not resize to {grid}x{grid}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
    return torch.cat([pos[:, :1], patch], dim=1).to(dtype)


def _timm_vit(state: dict[str, torch.Tensor]) -> nn.Module:
    # timm is an optional dependency (the `metrics` extra): imported only when DINOv2 is built.
    import timm

    dim = state["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    mlp = state["blocks.0.mlp.fc1.weight"].shape[0] / dim
    return timm.create_model(
        "vit_large_patch14_dinov2",
        pretrained=False,
        img_size=RESOLUTION,  # timm's default is the 518 of the stored grid
        embed_dim=dim,
        depth=depth,
        num_heads=dim // 64,  # every DINOv2 ViT has 64 channels per head
        mlp_ratio=mlp,
        init_values=1e-5,  # LayerScale (the loaded weights replace it)
        num_classes=0,
    )


class DINOv2(nn.Module):
    """uint8 images [N, 3, H, W] -> DINOv2 features [N, D] float32. ``state`` is the official
    state dict (``dinov2_vit*14_pretrain.pth``: ``cls_token``, ``pos_embed``, ``mask_token``,
    ``patch_embed.*``, ``blocks.N.*``, ``norm.*``); ViT-S/B/L with MLP blocks and no registers."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        state = {k: v for k, v in state.items() if k != "mask_token"}  # used only in training
        if any(k.startswith("register_tokens") or ".mlp.w12." in k for k in state):
            raise ValueError("DINOv2 with registers or SwiGLU blocks is not the FD_DINOv2 network (ViT-L/14)")
        self.vit = _timm_vit(state)
        state["pos_embed"] = official_pos_embed(state["pos_embed"], RESOLUTION // PATCH)
        self.vit.load_state_dict(state, strict=True)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        x = F.interpolate(images.float(), size=(RESOLUTION, RESOLUTION), mode="bicubic", antialias=True)
        x = (x / 255 - self.mean) / self.std
        return self.vit(x).float()
