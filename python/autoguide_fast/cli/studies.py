"""The commands of the studies: ``autoguide toy``, ``experiment``, ``sweep``, and the digits tools
``eval`` and ``classifier``."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .. import checks
from ..checkpoint import save
from ..data import read_images
from ..files import atomic_path, atomic_write_bytes, check_replaceable, strict_json
from ..studies import digits
from ..studies.digits_experiment import digits_experiment
from ..studies.digits_study import digits_seeds
from ..studies.sweep import sweep
from ..studies.toy import MAX_SETS, run
from ..studies.toy_search import search
from .common import floats


def add_toy(sub) -> None:
    toy = sub.add_parser(
        "toy",
        help="the paper's 2D toy experiment: train three models, sample with no guidance, CFG and "
        "autoguidance, print metrics, write a figure",
    )
    toy.add_argument("--out", default="runs/toy", help="run directory (models are reused from it)")
    toy.add_argument(
        "--seeds",
        type=checks.arg(checks.integer, 1, MAX_SETS),
        default=3,
        help="independent training sets (seeds 10k, 10k+1, 10k+2); metrics are mean +- std over them",
    )
    toy.add_argument(
        "--search",
        action="store_true",
        help="then search guides (capacity, training length, EMA, weight, interval) over the same sets",
    )
    toy.add_argument("--quick", action="store_true", help="tiny sizes, for tests only")
    toy.add_argument(
        "--retrain", action="store_true", help="train the models even if the run directory has them"
    )
    toy.add_argument("--no-progress", action="store_true", help="no progress bars")
    toy.set_defaults(func=_toy)


def add_experiment(sub) -> None:
    ex = sub.add_parser(
        "experiment",
        help="the digits guidance experiment (digits), or the same over training seeds with a guide search "
        "(digits-seeds)",
    )
    ex.add_argument("name", choices=["digits", "digits-seeds"], help="which experiment")
    ex.add_argument("--out", default=None, help="run directory (default: runs/<name>)")
    ex.add_argument(
        "--seeds",
        type=checks.arg(checks.integer, 1, 100),
        default=3,
        help="digits-seeds: independent training sets",
    )
    ex.add_argument("--quick", action="store_true", help="tiny sizes, for tests only")
    ex.set_defaults(func=_experiment)


def add_sweep(sub) -> None:
    sw = sub.add_parser("sweep", help="autoguidance weight x EMA length sweep (resumable)")
    sw.add_argument("--main", required=True, help="main snapshot or run directory")
    sw.add_argument("--guide", required=True, help="guide snapshot or run directory")
    sw.add_argument(
        "--weights",
        type=checks.arg(checks.parse_weights),
        default="1.5:3.0:0.25",
        help="lo:hi:step (hi included) or a comma list; at most 1000",
    )
    sw.add_argument("--ema-main", type=floats, default=None, help="EMA lengths of the main model (post hoc)")
    sw.add_argument("--ema-guide", type=floats, default=None, help="EMA lengths of the guide (post hoc)")
    sw.add_argument(
        "--guide-kimg",
        type=floats,
        default=None,
        help="guide training lengths: the guide run reconstructed at these times (kimg), e.g. 7.5,15,30",
    )
    sw.add_argument(
        "--seeds",
        type=checks.arg(checks.parse_seeds),
        default="0-499",
        help="the fixed seed set of every cell, e.g. 0-499",
    )
    sw.add_argument("--steps", type=checks.arg(checks.steps), default=16, help="sampler steps per image")
    sw.add_argument(
        "--metric",
        default="fd_digits",
        choices=["fd_digits", "fid", "fd_dinov2"],
        help="what picks the cell: the digits feature distance, or FID / FD_DINOv2 against --ref",
    )
    sw.add_argument("--ref", default=None, help="fid, fd_dinov2: reference statistics (.pkl or .npz)")
    sw.add_argument("--inception", default=None, help="fid: detector weights (default: $AUTOGUIDE_INCEPTION)")
    sw.add_argument("--dinov2", default=None, help="fd_dinov2: detector weights (default: $AUTOGUIDE_DINOV2)")
    sw.add_argument("--out", required=True, help="output directory (finished cells are reused from it)")
    sw.set_defaults(func=_sweep)


def add_eval(sub) -> None:
    ev = sub.add_parser(
        "eval", help="FD_digits (key fd), precision, recall and alignment of generated digits, as JSON"
    )
    ev.add_argument("--images", help="directory of PNGs (from autoguide generate) or .npz")
    ev.add_argument("--ref", default="digits", help="'digits' or reference statistics from --save-ref")
    ev.add_argument("--save-ref", help="write the reference statistics (an .npz archive) to this file")
    ev.add_argument("--out", help="also write the metrics as JSON to this file")
    ev.set_defaults(func=_eval)


def add_classifier(sub) -> None:
    cl = sub.add_parser("classifier", help="train the digits feature classifier (ships with the package)")
    cl.add_argument("--out", required=True, help="where to save its weights (.safetensors)")
    cl.add_argument("--epochs", type=checks.arg(checks.integer, 1), default=40, help="training epochs")
    cl.add_argument(
        "--seed", type=checks.arg(checks.seed), default=0, help="seed of the initialisation and batches"
    )
    cl.add_argument("--no-progress", action="store_true", help="no progress bar")
    cl.set_defaults(func=_classifier)


def _toy(args: argparse.Namespace) -> int:
    run(args.out, seeds=args.seeds, quick=args.quick, retrain=args.retrain, progress=not args.no_progress)
    if args.search:
        search(args.out, seeds=args.seeds, quick=args.quick, progress=not args.no_progress)
    return 0


def _experiment(args: argparse.Namespace) -> int:
    if args.name == "digits-seeds":
        digits_seeds(args.out or "runs/digits-seeds", seeds=args.seeds, quick=args.quick)
        return 0

    digits_experiment(args.out or "runs/digits", quick=args.quick)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    # sweep checks the rest (models, EMA lengths, --out) before it creates anything.
    detector = {"fid": args.inception, "fd_dinov2": args.dinov2}.get(args.metric)
    sweep(
        args.main,
        args.guide,
        args.weights,
        args.out,
        ema_main=args.ema_main,
        ema_guide=args.ema_guide,
        guide_kimg=args.guide_kimg,
        seeds=args.seeds,
        steps=args.steps,
        metric=args.metric,
        ref=args.ref,
        detector=detector,
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    if not (args.images or args.save_ref):
        raise ValueError(
            "give --images DIR|file.npz to measure generated digits, or --save-ref FILE to write the "
            "reference statistics"
        )
    if args.out and not args.images:
        raise ValueError("--out writes the metrics of --images: give --images too")
    if args.ref != "digits" and not Path(args.ref).exists():
        raise FileNotFoundError(
            f"--ref {args.ref}: no such file (give 'digits' or statistics from --save-ref)"
        )
    for target in (args.save_ref, args.out):
        if target:
            check_replaceable(Path(target))
    images = classes = result = None
    if args.images:
        images, classes = read_images(args.images)
        digits.check_images(images, classes, args.images)
    ref = digits.reference_stats() if args.ref == "digits" else digits.load_reference(args.ref)
    if images is not None:
        result = digits.evaluate(images, classes, ref=ref)
    if args.save_ref:
        with atomic_path(args.save_ref) as tmp, open(tmp, "wb") as f:
            np.savez(f, **ref)  # a file object: the name stays exactly the one given
        print(f"wrote {args.save_ref}")
    if result is not None:
        text = strict_json(result, indent=2)
        print(text)
        if args.out:
            atomic_write_bytes(args.out, (text + "\n").encode())
    return 0


def _classifier(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_replaceable(out)  # before training, not after
    parent = next(p for p in out.absolute().parents if p.exists())
    if not parent.is_dir():
        raise NotADirectoryError(f"--out {out}: {parent} is a file, not a directory")
    net, acc = digits.train_classifier(epochs=args.epochs, seed=args.seed, progress=not args.no_progress)
    save(net.state_dict(), out, dict(test_accuracy=str(acc)))  # atomic
    print(f"held-out accuracy {acc:.4f}; wrote {out}")
    return 0
