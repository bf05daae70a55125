"""``autoguide metrics ref|calc|gen``: FID and FD_DINOv2 as NVlabs/edm2's calculate_metrics.py
computes them."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch.distributed as dist

from .. import checks
from ..metrics import image_stats, load_ref, metrics_from_stats, save_ref, stats_of_batches
from ..parallel import init_process_group
from .common import (
    add_model_args,
    add_sampler_args,
    check_not_input,
    check_outputs,
    generate_batches,
    load_detectors,
    models_and_guidance,
    report,
)


def _metrics_ref(args: argparse.Namespace) -> int:
    if Path(args.out).suffix.lower() not in (".pkl", ".npz"):
        raise ValueError(f"--out must be a .pkl (the official layout) or an .npz file, got {args.out}")
    check_outputs(args.out)
    check_not_input(args.out, ("--data", args.data))
    device = init_process_group()
    detectors = load_detectors(args, device)
    stats = image_stats(
        args.data,
        detectors,
        num=args.num,
        batch=args.batch,
        workers=args.workers,
        device=device,
        progress=not args.no_progress,
    )
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_ref(stats, args.out)
        names = ", ".join(k for k in stats if k != "num_images")
        print(f"wrote {args.out} ({names}; {stats['num_images']} images)")
    return 0


def _metrics_calc(args: argparse.Namespace) -> int:
    check_outputs(args.out)
    check_not_input(args.out, ("--images", args.images), ("--ref", args.ref))
    ref = load_ref(args.ref)  # checked before any image is read
    device = init_process_group()
    detectors = load_detectors(args, device)
    stats = image_stats(
        args.images,
        detectors,
        num=args.num,
        seed=args.seed,
        batch=args.batch,
        workers=args.workers,
        device=device,
        progress=not args.no_progress,
    )
    report(args, {**metrics_from_stats(stats, ref), "num_images": stats["num_images"]})
    return 0


def _metrics_gen(args: argparse.Namespace) -> int:
    check_outputs(args.out)
    check_not_input(
        args.out, ("--ref", args.ref), ("--net", args.net), ("--guide", args.guide), ("--cfg", args.cfg)
    )
    ref = load_ref(args.ref)
    seeds = args.seeds or checks.seeds("--seed, --num", range(args.seed, args.seed + args.num))
    device = init_process_group()
    net, guidance, _, _ = models_and_guidance(args)
    detectors = load_detectors(args, device)
    batches = generate_batches(args, net, guidance, seeds, device)
    stats = stats_of_batches(
        (b.images for b in batches), detectors, device=device, total=len(seeds), progress=not args.no_progress
    )
    report(args, {**metrics_from_stats(stats, ref), "num_images": stats["num_images"]})
    return 0


def add_metrics(sub) -> None:
    me = sub.add_parser(
        "metrics",
        help="FID and FD_DINOv2 as NVlabs/edm2's calculate_metrics.py computes them: ref, calc, gen",
        description="FID and FD_DINOv2 from local detector files (nothing is downloaded). Under torchrun "
        "the images are split over the ranks and the statistics summed.",
    )
    ms = me.add_subparsers(dest="metrics_command", required=True)

    def common(p: argparse.ArgumentParser, batch: int) -> None:
        p.add_argument("--metrics", default="fid,fd_dinov2", help="comma list of fid, fd_dinov2")
        p.add_argument(
            "--inception",
            default=None,
            help="FID detector weights, pt_inception-2015-12-05-6726825d.pth (default: $AUTOGUIDE_INCEPTION)",
        )
        p.add_argument(
            "--dinov2",
            default=None,
            help="FD_DINOv2 detector weights, dinov2_vitl14_pretrain.pth (default: $AUTOGUIDE_DINOV2)",
        )
        p.add_argument(
            "--batch", type=checks.arg(checks.integer, 1), default=batch, help="images per batch and process"
        )
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    ref = ms.add_parser("ref", help="reference statistics of a data set (all its images by default)")
    ref.add_argument("--data", required=True, help="folder, .zip or .npz of images")
    ref.add_argument("--out", required=True, help="statistics file: .pkl (official layout) or .npz")
    ref.add_argument(
        "--num", type=checks.arg(checks.integer, 1), default=None, help="use this many images (default: all)"
    )
    ref.add_argument(
        "--workers", type=checks.arg(checks.integer, 0), default=2, help="image decoding processes"
    )
    common(ref, 64)
    ref.set_defaults(func=_metrics_ref)

    calc = ms.add_parser("calc", help="metrics of a folder, .zip or .npz of images against a reference")
    calc.add_argument("--images", required=True, help="folder, .zip or .npz of images")
    calc.add_argument("--ref", required=True, help="reference statistics (.pkl official layout, or .npz)")
    calc.add_argument(
        "--num",
        type=checks.arg(checks.integer, 1),
        default=50000,
        help="images to use, a seeded subset if more",
    )
    calc.add_argument("--seed", type=checks.arg(checks.seed), default=0, help="seed of the subset")
    calc.add_argument(
        "--workers", type=checks.arg(checks.integer, 0), default=2, help="image decoding processes"
    )
    calc.add_argument("--out", help="also write the result as JSON to this file")
    common(calc, 64)
    calc.set_defaults(func=_metrics_calc)

    gen = ms.add_parser("gen", help="generate and measure without writing images (as the official gen)")
    gen.add_argument("--ref", required=True, help="reference statistics (.pkl official layout, or .npz)")
    gen.add_argument(
        "--num",
        type=checks.arg(checks.integer, 1),
        default=50000,
        help="images: seeds --seed .. --seed + num - 1",
    )
    gen.add_argument("--seed", type=checks.arg(checks.seed), default=0, help="first seed")
    gen.add_argument(
        "--seeds",
        type=checks.arg(checks.parse_seeds),
        default=None,
        help="explicit seeds instead, e.g. 0-9999",
    )
    gen.add_argument(
        "--class",
        dest="class_idx",
        type=checks.arg(checks.integer, 0),
        default=None,
        help="class (default: random per seed)",
    )
    gen.add_argument("--out", help="also write the result as JSON to this file")
    add_model_args(gen)
    add_sampler_args(gen)
    common(gen, 32)
    gen.set_defaults(func=_metrics_gen)
