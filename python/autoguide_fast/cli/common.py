"""What several commands share: the model and sampler flags, loading models and guidance from
them, detectors, reports and output checks."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch.distributed as dist

from .. import checks
from ..checkpoint import load_network, read_metadata
from ..files import atomic_write_bytes, check_replaceable, strict_json
from ..generation import generate
from ..guidance import CFG, Autoguidance, Combined
from ..interop import presets
from ..interop.official import is_official_pickle, snapshot_metadata
from ..metrics import DETECTORS, detector


def floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def load_model(path: str, what: str, dtype: str | None = None):
    try:
        return load_network(path, dtype=dtype)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: no such model file: {path}") from None


def model_info(path: str) -> dict:
    meta = snapshot_metadata(path) if is_official_pickle(path) else read_metadata(path)
    return dict(path=str(Path(path).resolve()), nimg=meta.get("nimg"), ema_std=meta.get("ema_std"))


def models_and_guidance(args: argparse.Namespace):
    """The main model, the guidance and the manifest entries from the model flags of ``generate``
    (also ``metrics gen``)."""
    if args.preset:
        preset_models(args)
    elif not args.net:
        raise ValueError("give --net MODEL (or --preset NAME --models DIR)")
    if not (args.guide or args.cfg):
        given = [f for f, v in (("--weight", args.weight), ("--interval", args.interval)) if v is not None]
        given += ["--alpha"] if args.alpha is not None else []
        if given:
            raise ValueError(
                f"{', '.join(given)} need a guide: give --guide and/or --cfg (or a guided --preset)"
            )
    elif args.alpha is not None and not (args.guide and args.cfg):
        raise ValueError("--alpha splits the weight between --guide and --cfg: give both")
    weight = 1.0 if args.weight is None else args.weight
    dtype = None if args.dtype == "same" else args.dtype
    net = load_model(args.net, "--net", dtype)
    guide = load_model(args.guide, "--guide", dtype) if args.guide else None
    uncond = load_model(args.cfg, "--cfg", dtype) if args.cfg else None
    interval = args.interval
    if guide is not None and uncond is not None:
        guidance = Combined(
            guide, uncond, weight, alpha=0.5 if args.alpha is None else args.alpha, interval=interval
        )
    elif guide is not None:
        guidance = Autoguidance(guide, weight, interval=interval)
    elif uncond is not None:
        guidance = CFG(uncond, weight, interval=interval)
    else:
        guidance = None
    sources = (("net", args.net), ("guide", args.guide), ("cfg", args.cfg))
    models = {key: model_info(p) for key, p in sources if p}
    guidance_info = None
    if guidance is not None:
        guidance_info = dict(
            kind=type(guidance).__name__,
            weight=guidance.weight,
            interval=guidance.interval,
            alpha=getattr(guidance, "alpha", None),
        )
    return net, guidance, models, guidance_info


def generate_batches(args: argparse.Namespace, net, guidance, seeds, device, progress: bool = False):
    """``generate``'s batches for the model and sampler flags of ``generate`` and ``metrics gen``."""
    return generate(
        net,
        seeds,
        guidance=guidance,
        class_idx=args.class_idx,
        batch=args.batch,
        vae=args.vae,
        device=device,
        progress=progress,
        **sampler_options(args),
    )


def sampler_options(args: argparse.Namespace) -> dict:
    return dict(
        steps=args.steps,
        sigma_min=args.sigma_min,
        sigma_max=args.sigma_max,
        rho=args.rho,
        churn=args.churn,
        churn_min=args.churn_min,
        churn_max=args.churn_max,
        churn_noise=args.churn_noise,
    )


def load_detectors(args: argparse.Namespace, device) -> dict:
    names = [m.strip() for m in args.metrics.split(",") if m.strip()]
    bad = [m for m in names if m not in DETECTORS]
    if not names or bad or len(set(names)) != len(names):
        raise ValueError(f"--metrics must be distinct names from {','.join(DETECTORS)}, got {args.metrics!r}")
    files = {"fid": args.inception, "fd_dinov2": args.dinov2}
    return {m: detector(m, files[m], device) for m in names}


def report(args: argparse.Namespace, result: dict) -> None:
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    line = "  ".join(f"{k} {v:.6g}" for k, v in result.items() if k != "num_images")
    print(f"{line}  ({result['num_images']} images)")
    if args.out:
        atomic_write_bytes(args.out, (strict_json(result, indent=2) + "\n").encode())


def check_not_input(out, *inputs) -> None:
    """An output that names one of the command's inputs would overwrite it: refused."""
    if not out:
        return
    o = Path(out).resolve()
    for flag, given in inputs:
        if given and Path(given).exists() and Path(given).resolve() == o:
            raise ValueError(f"--out {out} is the {flag} input: it would be overwritten; give another --out")


def check_outputs(*paths) -> None:
    for p in paths:
        if p:
            check_replaceable(Path(p))


def add_model_args(p: argparse.ArgumentParser) -> None:
    # The main model, guide and guidance flags of `generate` and `metrics gen`.
    p.add_argument("--net", help="main model: a snapshot (.safetensors) or an official EDM2 .pkl")
    p.add_argument("--guide", help="autoguidance guide (.safetensors or official .pkl)")
    p.add_argument("--cfg", help="unconditional model for CFG (with --guide too: combined guidance)")
    p.add_argument("--preset", help="an official preset (autoguide presets lists them), with --models")
    p.add_argument("--models", help="folder holding the preset's files under their official names")
    p.add_argument("--vae", help="VAE folder for latent models (a downloaded stabilityai/sd-vae-ft-mse)")
    p.add_argument(
        "--dtype",
        choices=["same", "float32", "float16", "bfloat16"],
        default="same",
        help="network weights as stored (default: float16 models compute as the official code) or cast",
    )
    p.add_argument(
        "--weight", type=float, default=None, help="guidance weight (1 = none; default: 1 or the preset's)"
    )
    p.add_argument("--alpha", type=float, default=None, help="CFG share of the weight when combining (0.5)")
    p.add_argument("--interval", type=floats, help="guidance interval lo,hi in sigma units")


def add_sampler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--steps", type=checks.arg(checks.steps), default=32, help="sampler steps (Heun; the last one Euler)"
    )
    p.add_argument(
        "--sigma-min",
        type=float,
        default=None,
        help="lowest noise level (default: EDM's 0.002, raised to the lowest the model declares)",
    )
    p.add_argument(
        "--sigma-max",
        type=float,
        default=None,
        help="highest noise level (default: EDM's 80, lowered to the highest the model declares)",
    )
    p.add_argument("--rho", type=float, default=7.0, help="EDM's schedule exponent")
    p.add_argument("--churn", type=float, default=0.0, help="EDM S_churn (0 = deterministic sampler)")
    p.add_argument("--churn-min", type=float, default=0.0, help="EDM S_min: churn for sigma >= it")
    p.add_argument("--churn-max", type=float, default=float("inf"), help="EDM S_max: churn for sigma <= it")
    p.add_argument("--churn-noise", type=float, default=1.0, help="EDM S_noise")


def preset_models(args: argparse.Namespace) -> None:
    # --preset NAME --models DIR: the official files by their names, and the preset's weight.

    preset = presets.get(args.preset)
    if args.net or args.guide or args.cfg:
        raise ValueError("--preset names the models itself: give --models DIR, not --net/--guide/--cfg")
    if not args.models:
        raise ValueError(f"--preset needs --models DIR, the folder holding {', '.join(preset.files)}")
    found = presets.locate(preset, args.models)
    args.net = str(found["net"])
    if "gnet" in found:
        if preset.kind == "cfg":
            args.cfg = str(found["gnet"])
        else:
            args.guide = str(found["gnet"])
    if args.weight is None:
        args.weight = preset.guidance
