"""The ``autoguide`` command: one parser, one module per group of commands (each an ``add_<command>``
and its handler), one error policy (``main``)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys

from .._core import AutoguideError
from ..allocator import keep_freed_memory

__all__ = ["build_parser", "main"]


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    # "(default: X)" after every help text, except where there is nothing to show (None, a
    # switch) or the text already says what the default means.
    def _get_help_string(self, action):
        text = action.help or ""
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        nothing = switch or action.default is None or action.default == argparse.SUPPRESS
        if nothing or "default" in text:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Every parser and subparser shows each flag's default in its help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        # One line and a hint, not the whole usage (git, cargo): exit 2.
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    # The command modules import the library (torch and all): here, not at the top, so that
    # `main` catches a Ctrl-C during start-up as it does during the work.
    from . import dataset, generate, metrics, studies, train

    parser = _Parser(prog="autoguide", description="Autoguidance for diffusion models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also AUTOGUIDE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        studies.add_toy,
        train.add_train,
        train.add_ema,
        generate.add_generate,
        generate.add_convert,
        generate.add_presets,
        studies.add_eval,
        studies.add_classifier,
        studies.add_experiment,
        studies.add_sweep,
        metrics.add_metrics,
        dataset.add_dataset,
    ):
        add(sub)
    return parser


# Errors of what the user gave (a file, a flag, a value): one line, exit 2. Anything else is a bug
# or an environment failure: one line too, exit 1; --debug (or AUTOGUIDE_DEBUG=1) shows tracebacks.
_INPUT_ERRORS = (ValueError, TypeError, LookupError, OSError, argparse.ArgumentTypeError)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:  # during start-up (importing torch and the library): no traceback
        print("\nautoguide: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # --help (0), or a flag the parser refused (2, one line already printed)
        return e.code if isinstance(e.code, int) else 2
    debug = args.debug or os.environ.get("AUTOGUIDE_DEBUG", "").strip().lower() not in (
        "",
        "0",
        "no",
        "false",
        "off",
    )
    prefix = f"autoguide {args.command}"
    try:
        for flag in ("out", "out_dir", "dest"):  # an empty path would write into the current folder
            if getattr(args, flag, None) == "":
                raise ValueError(f"--{flag.replace('_', '-')} must not be empty")
        keep_freed_memory()  # every command's CPU work reuses freed memory (allocator)
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\n{prefix}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `autoguide ... | head`: the reader left; end quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        if debug:
            raise
        # The machine, not the input: a full disk, a quota, a file size limit, an I/O error.
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.ENOMEM):
            print(f"{prefix}: error: {_message(e)} (an environment failure, not the input)", file=sys.stderr)
            return 1
        print(f"{prefix}: error: {_message(e)}", file=sys.stderr)
        return 2
    except (*_INPUT_ERRORS, AutoguideError) as e:
        if debug:
            raise
        print(f"{prefix}: error: {_message(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if debug:
            raise
        print(
            f"{prefix}: error: unexpected {type(e).__name__}: {_message(e)} (--debug shows the traceback)",
            file=sys.stderr,
        )
        return 1


def _message(e: BaseException) -> str:
    text = str(e) if not isinstance(e, KeyError) else str(e.args[0]) if e.args else "KeyError"
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return " ".join(text.split()) or type(e).__name__
