"""The ``autoguide`` command."""

from __future__ import annotations

import argparse
import sys


def _toy(args: argparse.Namespace) -> int:
    from .toy import run

    run(args.out, quick=args.quick, retrain=args.retrain, progress=not args.no_progress)
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
