"""The FID detector: Inception-v3 as in TensorFlow's ``inception-2015-12-05`` graph, the network the
official FID tools (TTUR, NVlabs' ``inception-2015-12-05.pkl``, torch-fidelity) measure with.

Input uint8 images [N, 3, H, W] of any size; output the 2048 pool features [N, 2048] float32:
bilinear resize to 299 x 299 as TensorFlow 1 does it (source pixel ``i * in / out``, no half-pixel
offset, edge clamped), ``(x - 128) / 128``, the network, 8 x 8 average pool. The layer structure and
parameter names are the ones of the weight files people have (``pt_inception-2015-12-05-*.pth`` of
pytorch-fid / torch-fidelity, which hold TF's weights): convolutions without bias followed by batch
norm (eps 1e-3, TF's), TF's average pools that leave the padding out of the mean, and the max pool
in the last block's pool branch (a quirk of that graph). At load time each batch norm is folded into
its convolution (inference only), which changes float32 rounding, not the function, and the
activations run channels-last (1.5x faster on CPUs than the same network channels-first).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["InceptionV3", "resize_tf1_bilinear"]

RESOLUTION = 299  # the graph's input size
FEATURES = 2048


@functools.lru_cache(maxsize=16)
def _tf1_matrix(n_in: int, n_out: int) -> torch.Tensor:
    # Bilinear weights [n_out, n_in] of TF1's resize_bilinear(align_corners=False): the source
    # coordinate of output i is i * n_in / n_out (computed in float32, as TF does), its two
    # neighbours floor and floor + 1 clamped to the last pixel.
    src = torch.arange(n_out, dtype=torch.float32) * torch.tensor(n_in / n_out, dtype=torch.float32)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo.float()
    m = torch.zeros(n_out, n_in, dtype=torch.float32)
    rows = torch.arange(n_out)
    m.index_put_((rows, lo), 1 - frac, accumulate=True)
    m.index_put_((rows, hi), frac, accumulate=True)
    return m


def resize_tf1_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1's bilinear resize of float images [N, C, H, W] to [N, C, size, size], as two
    small matrix products (each output value mixes at most 2 x 2 input pixels)."""
    mh = _tf1_matrix(x.shape[2], size).to(x.device, x.dtype)
    mw = _tf1_matrix(x.shape[3], size).to(x.device, x.dtype)
    return mh @ x @ mw.T


class _Conv(nn.Module):
    """Convolution without bias + batch norm (eps 1e-3) + ReLU; :meth:`fold` merges the norm."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)
        self.folded: tuple[torch.Tensor, torch.Tensor] | None = None

    def fold(self) -> None:
        # w' = w * g / sqrt(var + eps), b' = beta - mean * g / sqrt(var + eps), in float64.
        bn = self.bn
        scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
        w = (self.conv.weight.double() * scale[:, None, None, None]).float()
        w = w.contiguous(memory_format=torch.channels_last)  # oneDNN / cuDNN's fast layout
        b = (bn.bias.double() - bn.running_mean.double() * scale).float()
        self.folded = (w, b)

    def _apply(self, fn, *args, **kwargs):  # .to(device) moves the folded weights too
        super()._apply(fn, *args, **kwargs)
        if self.folded is not None:
            self.folded = tuple(fn(t) for t in self.folded)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded is None:
            return F.relu(self.bn(self.conv(x)))
        c = self.conv
        return F.relu(F.conv2d(x, *self.folded, stride=c.stride, padding=c.padding))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TF's 3x3 average pool: the zero padding is left out of the mean.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _BlockA(nn.Module):
    def __init__(self, cin: int, pool: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1 = _Conv(cin, 48, 1)
        self.branch5x5_2 = _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x))], 1)


class _BlockB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1 = _Conv(cin, c7, 1)
        self.branch7x7_2 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _Conv(cin, c7, 1)
        self.branch7x7dbl_2 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x))], 1)


class _BlockD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = _Conv(cin, 192, 1)
        self.branch3x3_2 = _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockE(nn.Module):
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool  # the graph's last block pools by max (a quirk of that graph)
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(cin, 448, 1)
        self.branch3x3dbl_2 = _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        p = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(p)], 1)


class InceptionV3(nn.Module):
    """uint8 images [N, 3, H, W] -> pool features [N, 2048] float32 (eval mode, no gradients).
    Parameter names are those of ``pt_inception-2015-12-05-*.pth``; ``fc`` (1008 classes) is kept so
    that file loads strictly, and is not used for the features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b = _BlockA(192, pool=32)
        self.Mixed_5c = _BlockA(256, pool=64)
        self.Mixed_5d = _BlockA(288, pool=64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b = _BlockC(768, c7=128)
        self.Mixed_6c = _BlockC(768, c7=160)
        self.Mixed_6d = _BlockC(768, c7=160)
        self.Mixed_6e = _BlockC(768, c7=192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b = _BlockE(1280, max_pool=False)
        self.Mixed_7c = _BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)
        self.requires_grad_(False)
        self.eval()

    def fold(self) -> InceptionV3:
        """Folds every batch norm into its convolution (after the weights are loaded)."""
        for m in self.modules():
            if isinstance(m, _Conv):
                m.fold()
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        x = resize_tf1_bilinear(images.float(), RESOLUTION)
        x = ((x - 128) / 128).contiguous(memory_format=torch.channels_last)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean((2, 3), dtype=torch.float32)
