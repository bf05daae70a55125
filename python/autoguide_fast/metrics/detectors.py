"""The detectors of FID and FD_DINOv2, built from weight files the user has (nothing is downloaded).

Where the files come from (download once, on a machine with internet access):

- FID, Inception-v3 (``inception-2015-12-05``): ``pt_inception-2015-12-05-6726825d.pth`` from the
  pytorch-fid releases (github.com/mseitzer/pytorch-fid, "fid_weights"), the same weights as
  torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``.
- FD_DINOv2, ViT-L/14: ``dinov2_vitl14_pretrain.pth`` from facebookresearch/dinov2 (the file
  ``torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14')`` caches under
  ``~/.cache/torch/hub/checkpoints``).

Paths: the ``weights`` argument (CLI ``--inception`` / ``--dinov2``), else the environment variables
``AUTOGUIDE_INCEPTION`` / ``AUTOGUIDE_DINOV2``. Files are read with ``torch.load(weights_only=True)``
(tensors only) or as safetensors.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from .. import checks
from ..interop.official import Record, _module_tensors, is_official_pickle, unpickle
from ..interop.torchscript import is_torchscript, read_tensors
from .dinov2 import DINOv2
from .inception import FEATURES, InceptionV3

__all__ = ["DETECTORS", "detector", "dinov2", "inception", "weights_path"]

# metric -> (environment variable, file to get, feature dimension of the paper's network)
DETECTORS = {
    "fid": (
        "AUTOGUIDE_INCEPTION",
        "pt_inception-2015-12-05-6726825d.pth (pytorch-fid's release 'fid_weights', or torch-fidelity's "
        "weights-inception-2015-12-05-6726825d.pth)",
        FEATURES,
    ),
    "fd_dinov2": (
        "AUTOGUIDE_DINOV2",
        "dinov2_vitl14_pretrain.pth (facebookresearch/dinov2, ViT-L/14; torch.hub caches it in "
        "~/.cache/torch/hub/checkpoints)",
        1024,
    ),
}


def weights_path(metric: str, weights: str | os.PathLike | None = None) -> Path:
    """The weight file of ``metric``'s detector: ``weights``, else its environment variable; a
    clear error naming the file to get when neither is given or the file is missing."""
    if metric not in DETECTORS:
        raise ValueError(f"metric must be one of {sorted(DETECTORS)}, got {metric!r}")
    env, source, _ = DETECTORS[metric]
    given = weights if weights is not None else os.environ.get(env) or None
    if given is None:
        raise FileNotFoundError(
            f"{metric} needs the detector weights {source}: give the file's path (--{_flag(metric)} or "
            f"{env}); nothing is downloaded"
        )
    path = Path(given)
    if not path.is_file():
        raise FileNotFoundError(f"{metric} detector weights not found: {path} (expected {source})")
    return path


def _device(device) -> torch.device:
    # The same default as the statistics (metrics.compute): the GPU when there is one.
    return checks.device("device", device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _flag(metric: str) -> str:
    return "inception" if metric == "fid" else "dinov2"


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickles with code, TorchScript archives, damaged files
        raise ValueError(
            f"{path}: not a state dict that loads without executing code "
            f"(torch.load weights_only): {str(e).splitlines()[0]}"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return state


# NVIDIA's translation of the TF graph (inception-2015-12-05.pt / .pkl) names its layers after the
# graph (layers.mixed_4.tower_1.conv_4 ...) and stores per convolution weight, beta, mean, var (no
# batch-norm scale: the graph's is 1). Its names -> pt_inception's, block by block.
_A = {
    "conv": "branch1x1",
    "tower.conv": "branch5x5_1",
    "tower.conv_1": "branch5x5_2",
    "tower_1.conv": "branch3x3dbl_1",
    "tower_1.conv_1": "branch3x3dbl_2",
    "tower_1.conv_2": "branch3x3dbl_3",
    "tower_2.conv": "branch_pool",
}
_B = {
    "conv": "branch3x3",
    "tower.conv": "branch3x3dbl_1",
    "tower.conv_1": "branch3x3dbl_2",
    "tower.conv_2": "branch3x3dbl_3",
}
_C = {
    "conv": "branch1x1",
    "tower.conv": "branch7x7_1",
    "tower.conv_1": "branch7x7_2",
    "tower.conv_2": "branch7x7_3",
    **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7dbl_{i + 1}" for i in range(5)},
    "tower_2.conv": "branch_pool",
}
_D = {
    "tower.conv": "branch3x3_1",
    "tower.conv_1": "branch3x3_2",
    **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7x3_{i + 1}" for i in range(4)},
}
_E = {
    "conv": "branch1x1",
    "tower_conv": "branch3x3_1",
    "tower_mixed_conv": "branch3x3_2a",
    "tower_mixed_conv_1": "branch3x3_2b",
    "tower_1_conv": "branch3x3dbl_1",
    "tower_1_conv_1": "branch3x3dbl_2",
    "tower_1_mixed_conv": "branch3x3dbl_3a",
    "tower_1_mixed_conv_1": "branch3x3dbl_3b",
    "tower_2_conv": "branch_pool",
}
_NVIDIA_LAYERS = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
    **{
        f"mixed{s}.{k}": f"Mixed_{b}.{v}"
        for s, b in (("", "5b"), ("_1", "5c"), ("_2", "5d"))
        for k, v in _A.items()
    },
    **{f"mixed_3.{k}": f"Mixed_6a.{v}" for k, v in _B.items()},
    **{
        f"mixed_{i + 4}.{k}": f"Mixed_{b}.{v}"
        for i, b in enumerate(("6b", "6c", "6d", "6e"))
        for k, v in _C.items()
    },
    **{f"mixed_8.{k}": f"Mixed_7a.{v}" for k, v in _D.items()},
    **{f"mixed_{i + 9}.{k}": f"Mixed_{b}.{v}" for i, b in enumerate(("7b", "7c")) for k, v in _E.items()},
}
_NVIDIA_PARAMS = {
    "weight": "conv.weight",
    "beta": "bn.bias",
    "mean": "bn.running_mean",
    "var": "bn.running_var",
}


def _from_nvidia(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in state.items():
        if key in ("output.weight", "output.bias"):
            out["fc." + key.split(".")[1]] = t
            continue
        layer, _, param = key.removeprefix("layers.").rpartition(".")
        if layer not in _NVIDIA_LAYERS or param not in _NVIDIA_PARAMS:
            raise ValueError(f"{path}: not NVIDIA's inception-2015-12-05 (unknown tensor {key})")
        out[f"{_NVIDIA_LAYERS[layer]}.{_NVIDIA_PARAMS[param]}"] = t
        if param == "beta":
            out[f"{_NVIDIA_LAYERS[layer]}.bn.weight"] = torch.ones_like(t)
    return out


def _inception_state(path: Path) -> dict[str, torch.Tensor]:
    """pt_inception's layout from any of the three files: the .pth state dict, NVIDIA's TorchScript
    ``.pt`` (its tensors; its code is not run) or NVIDIA's ``.pkl`` (through the restricted reader)."""
    if is_torchscript(path):
        return _from_nvidia(read_tensors(path), path)
    if is_official_pickle(path):
        root = unpickle(path)
        tensors: dict[str, torch.Tensor] = {}
        if isinstance(root, Record):
            _module_tensors(root, "", tensors)
        if not tensors:
            raise ValueError(f"{path}: holds no network (expected NVIDIA's inception-2015-12-05.pkl)")
        return _from_nvidia(tensors, path)
    return _read_state(path)


def _load(module: torch.nn.Module, state: dict, path: Path, what: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = " ".join(str(e).split())
        raise ValueError(f"{path}: not the {what} weights ({lines[:300]})") from None


def inception(weights: str | os.PathLike | None = None, device=None) -> InceptionV3:
    """The FID detector: uint8 [N, 3, H, W] -> [N, 2048] float32 features (see
    :mod:`autoguide_fast.metrics.inception`), from ``pt_inception-2015-12-05-*.pth`` (pytorch-fid,
    torch-fidelity), NVIDIA's TorchScript ``inception-2015-12-05.pt`` (its tensors are read, its
    code is not run) or NVIDIA's ``inception-2015-12-05.pkl`` where the restricted pickle reader
    can take its tensors."""
    path = weights_path("fid", weights)
    state = {k: v for k, v in _inception_state(path).items() if not k.endswith("num_batches_tracked")}
    net = InceptionV3()
    # num_batches_tracked is a training counter, absent from converted files: not required.
    missing = {k for k in net.state_dict() if k.endswith("num_batches_tracked")}
    state.update({k: net.state_dict()[k] for k in missing})
    _load(net, state, path, "Inception-v3 (inception-2015-12-05)")
    return net.fold().to(_device(device))


def dinov2(weights: str | os.PathLike | None = None, device=None) -> DINOv2:
    """The FD_DINOv2 detector: uint8 [N, 3, H, W] -> [N, 1024] float32 (ViT-L/14), from the
    official ``dinov2_vitl14_pretrain.pth`` (needs timm: the ``metrics`` extra)."""
    path = weights_path("fd_dinov2", weights)
    state = _read_state(path)
    need = {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight", "norm.weight"}
    if not need <= set(state):
        raise ValueError(f"{path}: not DINOv2 weights (missing {sorted(need - set(state))[:3]})")
    try:
        net = DINOv2(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: not DINOv2 ViT weights ({' '.join(str(e).split())[:300]})") from None
    return net.to(_device(device))


def detector(metric: str, weights: str | os.PathLike | None = None, device=None) -> torch.nn.Module:
    """``inception`` for ``'fid'``, ``dinov2`` for ``'fd_dinov2'``."""
    path = weights_path(metric, weights)
    return inception(path, device) if metric == "fid" else dinov2(path, device)
