"""``autoguide dataset convert|encode``: data sets in the EDM2 layout (:mod:`autoguide_fast.data.tool`)."""

from __future__ import annotations

import argparse

import torch.distributed as dist

from .. import checks
from ..data.tool import TRANSFORMS, convert, encode, parse_resolution
from ..parallel import init_process_group


def _resolution_arg(text: str) -> tuple[int, int]:
    try:
        return parse_resolution(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_dataset(sub) -> None:
    ds = sub.add_parser(
        "dataset",
        help="make EDM2 data sets: convert images to a PNG zip, encode them to VAE latents",
        description="Data sets in the EDM2 layout, as NVlabs/edm2's dataset_tool.py makes them.",
    )
    sub = ds.add_subparsers(dest="dataset_command", required=True)
    cv = sub.add_parser(
        "convert",
        help="folder or zip of images -> square power-of-two PNGs in a zip or folder, with labels",
        description="Images in name order, converted to RGB; labels from dataset.json or, for a folder, "
        "from the top-level folder names.",
    )
    cv.add_argument("--source", required=True, help="folder (recursive) or .zip of images")
    cv.add_argument("--dest", required=True, help="output .zip, or a new or empty folder")
    cv.add_argument(
        "--transform",
        choices=TRANSFORMS,
        default=None,
        help="crop mode (default: none, resize to --resolution if given)",
    )
    cv.add_argument(
        "--resolution",
        type=_resolution_arg,
        default=None,
        metavar="WxH",
        help="output size, square power-of-two (center-crop-wide: H <= W); needed with --transform "
        "(default: the input size)",
    )
    cv.add_argument(
        "--max-images",
        type=checks.arg(checks.integer, 1),
        default=None,
        help="read at most this many (default: all)",
    )
    cv.add_argument("--no-progress", action="store_true", help="no progress bar")
    cv.set_defaults(func=_convert_cli)

    en = sub.add_parser(
        "encode",
        help="pixel data set -> VAE posterior mean and std per image (.npy), for latent models",
        description="As the official encode (StabilityVAEEncoder). Under torchrun the batches are "
        "split over the ranks; the output equals a one-process run.",
    )
    en.add_argument("--source", required=True, help="pixel data set: folder or .zip (a convert output)")
    en.add_argument("--dest", required=True, help="output .zip, or a new or empty folder")
    en.add_argument(
        "--vae",
        required=True,
        help="local diffusers AutoencoderKL folder, e.g. a downloaded stabilityai/sd-vae-ft-mse",
    )
    en.add_argument(
        "--batch", type=checks.arg(checks.integer, 1), default=8, help="images per VAE call and process"
    )
    en.add_argument(
        "--max-images",
        type=checks.arg(checks.integer, 1),
        default=None,
        help="encode at most this many (default: all)",
    )
    en.add_argument("--no-progress", action="store_true", help="no progress bar")
    en.set_defaults(func=_encode_cli)


def _convert_cli(args: argparse.Namespace) -> int:
    r = convert(
        args.source,
        args.dest,
        transform=args.transform,
        resolution=args.resolution,
        max_images=args.max_images,
        progress=not args.no_progress,
    )
    skipped = f", {r['skipped']} too small skipped" if r["skipped"] else ""
    labels = "labelled" if r["labels"] else "unlabelled"
    side = r["resolution"]
    print(f"{r['images']} images {side}x{side} ({labels}{skipped}) -> {r['dest']}")
    return 0


def _encode_cli(args: argparse.Namespace) -> int:

    device = init_process_group()
    r = encode(
        args.source,
        args.dest,
        vae=args.vae,
        batch=args.batch,
        max_images=args.max_images,
        device=device,
        progress=not args.no_progress,
    )
    if not dist.is_initialized() or dist.get_rank() == 0:
        labels = "labelled" if r["labels"] else "unlabelled"
        print(f"{r['images']} latents {'x'.join(map(str, r['shape']))} ({labels}) -> {r['dest']}")
    return 0
