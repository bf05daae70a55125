"""``autoguide generate``, ``autoguide convert`` and ``autoguide presets``."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import __version__, checks
from ..checkpoint import convert
from ..generation import compact_seeds, write_outputs
from ..interop import presets
from ..parallel import init_process_group
from .common import (
    add_model_args,
    add_sampler_args,
    check_not_input,
    generate_batches,
    models_and_guidance,
    sampler_options,
)


def add_generate(sub) -> None:
    ge = sub.add_parser(
        "generate",
        help="generate images from seeds (autoguidance, CFG or both); official EDM2 .pkl files are read "
        "safely, as are the official presets",
    )
    add_model_args(ge)
    add_sampler_args(ge)
    ge.add_argument(
        "--seeds", type=checks.arg(checks.parse_seeds), default="0-63", help="e.g. 0-9999 or 1,5,7-9"
    )
    ge.add_argument(
        "--class",
        dest="class_idx",
        type=checks.arg(checks.integer, 0),
        default=None,
        help="class (default: random per seed)",
    )
    ge.add_argument(
        "--batch",
        type=checks.arg(checks.integer, 1),
        default=64,
        help="images per sampler call (images do not depend on it)",
    )
    ge.add_argument("--out", required=True, help="directory of PNGs, or a .npz file")
    ge.add_argument("--subdirs", action="store_true", help="one subdirectory per 1000 seeds")
    ge.add_argument("--no-progress", action="store_true", help="no progress bar")
    ge.set_defaults(func=_generate)


def add_convert(sub) -> None:
    co = sub.add_parser(
        "convert",
        help="official EDM2 pickle(s) -> safetensors snapshot(s) (read safely: nothing in the pickle runs)",
    )
    co.add_argument("src", help="an official .pkl, or a folder of them (e.g. raw training snapshots)")
    co.add_argument("--out", required=True, help="output .safetensors file, or folder")
    co.set_defaults(func=_convert)


def add_presets(sub) -> None:
    pr = sub.add_parser("presets", help="the official EDM2 generation presets, with the paper's FID")
    pr.add_argument("--kind", choices=["none", "cfg", "autoguidance"], help="only presets of this kind")
    pr.set_defaults(func=_presets)


def _generate(args: argparse.Namespace) -> int:
    seeds = args.seeds
    out = Path(args.out)
    check_not_input(
        out, ("--net", args.net), ("--guide", args.guide), ("--cfg", args.cfg), ("--vae", args.vae)
    )
    if out.suffix != ".npz" and out.exists() and not out.is_dir():
        raise ValueError(f"out must be a directory or a .npz path, got the file {out}")
    if out.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".safetensors", ".pkl") and not out.is_dir():
        raise ValueError(f"--out must be a directory of PNGs or a .npz file, got {out}")
    device = init_process_group()  # under torchrun: the process group, this rank's device
    net, guidance, models, guidance_info = models_and_guidance(args)
    sampler = sampler_options(args)
    manifest = dict(
        version=__version__,
        preset=args.preset,
        models=models,
        guidance=guidance_info,
        seeds=compact_seeds(seeds),
        class_idx=args.class_idx,
        sampler=sampler,
        vae=str(Path(args.vae).resolve()) if args.vae else None,
    )
    batches = generate_batches(args, net, guidance, seeds, device, progress=not args.no_progress)
    write_outputs(batches, out, manifest, subdirs=args.subdirs)
    return 0


def _convert(args: argparse.Namespace) -> int:
    check_not_input(args.out, ("src", args.src))
    for p in convert(args.src, args.out):
        print(p)
    return 0


def _presets(args: argparse.Namespace) -> int:
    print(presets.table(kind=args.kind))
    print(f"\nFiles: {presets.MODEL_ROOT}/<net or gnet>. Use: autoguide generate --preset NAME --models DIR")
    return 0
