"""The ``autoguide`` command."""

from __future__ import annotations

import argparse
import sys


def _toy(args: argparse.Namespace) -> int:
    from .toy import run

    run(args.out, quick=args.quick, retrain=args.retrain, progress=not args.no_progress)
    return 0


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _train(args: argparse.Namespace) -> int:
    from .training import TrainOptions, train

    opts = TrainOptions(
        preset=args.preset, cond=args.cond, kimg=args.kimg, batch=args.batch, batch_gpu=args.batch_gpu,
        lr=args.lr, lr_decay_kimg=args.lr_decay_kimg, rampup_kimg=args.rampup_kimg, ema_stds=args.ema,
        snapshot_kimg=args.snapshot_kimg, checkpoint_kimg=args.checkpoint_kimg or args.snapshot_kimg,
        log_kimg=args.log_kimg, dropout=args.dropout, precision=args.precision, seed=args.seed,
    )  # fmt: skip
    result = train(args.data, args.out, opts, progress=not args.no_progress)
    return 0 if result["status"] == "done" else 3


def _ema(args: argparse.Namespace) -> int:
    from .ema import list_snapshots, reconstruct

    if args.list:
        rows = list_snapshots(args.list)
        print(f"{len(rows)} snapshots in {args.list}")
        for s in rows:
            print(f"  nimg {s.nimg:>10d}  ({s.nimg / 1000:8.1f} kimg)  std {s.std:.3f}  {s.path.name}")
        return 0
    if not (args.snapshots and args.std and args.out):
        raise ValueError("autoguide ema needs --snapshots, --std and --out (or --list DIR)")
    paths = reconstruct(args.snapshots, args.std, args.nimg, args.out, progress=not args.no_progress)
    for p in paths:
        print(p)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoguide", description="Autoguidance for diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)
    toy = sub.add_parser(
        "toy",
        help="the paper's 2D toy experiment: train three models, sample with no guidance, CFG and "
        "autoguidance, print metrics, write a figure",
    )
    toy.add_argument("--out", default="runs/toy", help="run directory (models are reused from it)")
    toy.add_argument("--quick", action="store_true", help="tiny sizes, for tests only")
    toy.add_argument(
        "--retrain", action="store_true", help="train the models even if the run directory has them"
    )
    toy.add_argument("--no-progress", action="store_true", help="no progress bars")
    toy.set_defaults(func=_toy)

    tr = sub.add_parser(
        "train",
        help="train an EDM2 network (resumes from the newest checkpoint in --out; torchrun for many GPUs)",
    )
    tr.add_argument("--data", default="digits", help="'digits', a folder or .zip of PNGs, or an .npz")
    tr.add_argument("--preset", default="digits-s", help="network preset (see networks.PRESETS)")
    tr.add_argument("--out", required=True, help="run directory")
    tr.add_argument("--kimg", type=float, default=200.0, help="training length in thousands of images")
    tr.add_argument("--batch", type=int, default=128, help="total batch size")
    tr.add_argument("--batch-gpu", type=int, default=None, help="per-process batch per accumulation round")
    cond = tr.add_mutually_exclusive_group()
    cond.add_argument(
        "--cond", dest="cond", action="store_true", default=True, help="class-conditional (default)"
    )
    cond.add_argument("--uncond", dest="cond", action="store_false", help="unconditional (a CFG guide)")
    tr.add_argument("--lr", type=float, default=0.01, help="reference learning rate")
    tr.add_argument("--lr-decay-kimg", type=float, default=50.0, help="inverse-sqrt decay starts here")
    tr.add_argument("--rampup-kimg", type=float, default=2.0, help="learning-rate ramp-up length")
    tr.add_argument("--ema", type=_floats, default=(0.05, 0.10), help="EMA widths, e.g. 0.05,0.10")
    tr.add_argument("--snapshot-kimg", type=float, default=25.0, help="network snapshot interval")
    tr.add_argument(
        "--checkpoint-kimg", type=float, default=None, help="training-state interval (default: snapshot)"
    )
    tr.add_argument("--log-kimg", type=float, default=1.0, help="stats.jsonl interval")
    tr.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    tr.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32", help="autocast on CUDA")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.set_defaults(func=_train)

    em = sub.add_parser("ema", help="post-hoc EMA: reconstruct EMA widths from a run's snapshots")
    em.add_argument("--snapshots", help="run directory with network snapshots")
    em.add_argument("--std", type=_floats, help="EMA widths to reconstruct, e.g. 0.05,0.07,0.10")
    em.add_argument("--nimg", type=int, default=None, help="training time to reconstruct (default: newest)")
    em.add_argument("--out", help="output directory")
    em.add_argument("--list", metavar="DIR", help="list the snapshots of DIR (nimg, std) and exit")
    em.add_argument("--no-progress", action="store_true")
    em.set_defaults(func=_ema)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"autoguide {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
