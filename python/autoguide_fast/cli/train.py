"""``autoguide train`` and ``autoguide ema``."""

from __future__ import annotations

import argparse
from dataclasses import fields

import torch.distributed as dist

from .. import checks
from ..ema import list_snapshots, reconstruct
from ..training import TrainOptions, preset_defaults, train
from .common import floats


def add_train(sub) -> None:
    tr = sub.add_parser(
        "train",
        help="train an EDM2 network (resumes from the newest checkpoint in --out; torchrun for many GPUs)",
    )
    tr.add_argument("--data", default="digits", help="'digits', a folder or .zip of PNGs, or an .npz")
    tr.add_argument(
        "--data-loading",
        choices=["auto", "memory", "stream"],
        default="auto",
        help="hold the data set in memory, or stream it from disk with --workers processes "
        "(auto: stream when it decodes to more than 1 GiB)",
    )
    tr.add_argument(
        "--workers",
        type=checks.arg(checks.integer, 0),
        default=2,
        help="data loading processes when streaming",
    )
    tr.add_argument("--preset", default="digits-s", help="network preset (see networks.PRESETS)")
    tr.add_argument("--out", required=True, help="run directory")
    tr.add_argument(
        "--kimg",
        type=float,
        default=None,
        help="training length in thousands of images (default: 200, or an edm2-* preset's official length)",
    )
    tr.add_argument(
        "--batch",
        type=checks.arg(checks.integer, 1),
        default=None,
        help="total batch size (default: 128, edm2-* presets 2048)",
    )
    tr.add_argument(
        "--batch-gpu",
        type=checks.arg(checks.integer, 1),
        default=None,
        help="per-process batch per accumulation round",
    )
    cond = tr.add_mutually_exclusive_group()
    cond.add_argument(
        "--cond", dest="cond", action="store_true", default=True, help="class-conditional (default)"
    )
    cond.add_argument("--uncond", dest="cond", action="store_false", help="unconditional (a CFG guide)")
    tr.add_argument(
        "--lr", type=float, default=None, help="reference learning rate (default: 0.01, or the preset's)"
    )
    tr.add_argument(
        "--lr-decay-kimg",
        type=float,
        default=None,
        help="inverse-sqrt decay starts here (default: 50, or the preset's official value)",
    )
    tr.add_argument(
        "--rampup-kimg",
        type=float,
        default=None,
        help="learning-rate ramp-up length (default: 2, edm2-* 10000)",
    )
    tr.add_argument("--ema", type=floats, default=(0.05, 0.10), help="EMA widths, e.g. 0.05,0.10")
    tr.add_argument("--snapshot-kimg", type=float, default=25.0, help="network snapshot interval")
    tr.add_argument(
        "--checkpoint-kimg", type=float, default=None, help="training-state interval (default: snapshot)"
    )
    tr.add_argument("--log-kimg", type=float, default=1.0, help="stats.jsonl interval")
    tr.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    tr.add_argument(
        "--P-mean",
        dest="P_mean",
        type=float,
        default=None,
        help="mean of the training log-sigma (default: -0.8, ImageNet-64's; edm2-img512-* -0.4)",
    )
    tr.add_argument(
        "--P-std",
        dest="P_std",
        type=float,
        default=None,
        help="std of the training log-sigma (default: 1.6; edm2-img512-* 1.0)",
    )
    tr.add_argument(
        "--snapshot-dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="dtype of the network snapshots (default: float16 for edm2-* presets, as the official ones; "
        "else the training dtype)",
    )
    tr.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16", "fp64"],
        default="fp32",
        help="fp16/bf16: autocast on CUDA; fp64: float64 reference-precision run (slow)",
    )
    tr.add_argument(
        "--seed",
        type=checks.arg(checks.seed),
        default=0,
        help="seed of the initialisation, data order and noise",
    )
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.set_defaults(func=_train)


def add_ema(sub) -> None:
    em = sub.add_parser("ema", help="post-hoc EMA: reconstruct EMA widths from a run's snapshots")
    em.add_argument("--snapshots", help="run directory with network snapshots")
    em.add_argument("--std", type=floats, help="EMA widths to reconstruct, e.g. 0.05,0.07,0.10")
    em.add_argument(
        "--nimg",
        type=checks.arg(checks.integer, 0),
        default=None,
        help="training time to reconstruct (default: newest)",
    )
    em.add_argument("--out", help="output directory")
    em.add_argument("--list", metavar="DIR", help="list the snapshots of DIR (nimg, std) and exit")
    em.add_argument(
        "--dtype",
        choices=["same", "float32", "float16", "bfloat16"],
        default="same",
        help="dtype of the outputs (default: that of the snapshots)",
    )
    em.add_argument("--no-progress", action="store_true", help="no progress bar")
    em.set_defaults(func=_ema)


def _train(args: argparse.Namespace) -> int:
    # A flag not given takes the published preset's official setting, else the library default.
    defaults = {**{f.name: f.default for f in fields(TrainOptions)}, **preset_defaults(args.preset)}

    def pick(name: str, given):
        return defaults[name] if given is None else given

    opts = TrainOptions(
        preset=args.preset,
        cond=args.cond,
        kimg=pick("kimg", args.kimg),
        batch=pick("batch", args.batch),
        batch_gpu=args.batch_gpu,
        lr=pick("lr", args.lr),
        lr_decay_kimg=pick("lr_decay_kimg", args.lr_decay_kimg),
        rampup_kimg=pick("rampup_kimg", args.rampup_kimg),
        ema_stds=args.ema,
        snapshot_kimg=args.snapshot_kimg,
        checkpoint_kimg=args.snapshot_kimg if args.checkpoint_kimg is None else args.checkpoint_kimg,
        log_kimg=args.log_kimg,
        dropout=pick("dropout", args.dropout),
        P_mean=pick("P_mean", args.P_mean),
        P_std=pick("P_std", args.P_std),
        precision=args.precision,
        seed=args.seed,
        snapshot_dtype=args.snapshot_dtype,
    )
    stream = {"auto": None, "memory": False, "stream": True}[args.data_loading]
    result = train(
        args.data, args.out, opts, progress=not args.no_progress, stream=stream, workers=args.workers
    )

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(
            f"{result['status']}: {result['nimg']} images, {result['step']} steps; run folder {result['out']}"
        )
    return 0 if result["status"] == "done" else 3


def _ema(args: argparse.Namespace) -> int:
    if args.list:
        rows = list_snapshots(args.list)
        print(f"{len(rows)} snapshots in {args.list}")
        for s in rows:
            print(f"  nimg {s.nimg:>10d}  ({s.nimg / 1000:8.1f} kimg)  std {s.std:.3f}  {s.path.name}")
        return 0
    if not (args.snapshots and args.std and args.out):
        raise ValueError("autoguide ema needs --snapshots, --std and --out (or --list DIR)")
    dtype = None if args.dtype == "same" else args.dtype
    paths = reconstruct(
        args.snapshots, args.std, args.nimg, args.out, progress=not args.no_progress, dtype=dtype
    )
    for p in paths:
        print(p)
    return 0
