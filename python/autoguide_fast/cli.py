"""The ``autoguide`` command."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
from dataclasses import fields
from pathlib import Path

from . import dataset_tool
from .parallel import init_process_group


def _toy(args: argparse.Namespace) -> int:
    from .toy import run

    run(args.out, seeds=args.seeds, quick=args.quick, retrain=args.retrain, progress=not args.no_progress)
    if args.search:
        from .toy_search import search

        search(args.out, seeds=args.seeds, quick=args.quick, progress=not args.no_progress)
    return 0


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _train(args: argparse.Namespace) -> int:
    from .training import TrainOptions, preset_defaults, train

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
    import torch.distributed as dist  # (after training: the process group is up under torchrun)

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(
            f"{result['status']}: {result['nimg']} images, {result['step']} steps; run folder {result['out']}"
        )
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
    dtype = None if args.dtype == "same" else args.dtype
    paths = reconstruct(
        args.snapshots, args.std, args.nimg, args.out, progress=not args.no_progress, dtype=dtype
    )
    for p in paths:
        print(p)
    return 0


def _load_model(path: str, what: str, dtype: str | None = None):
    from .checkpoint import load_network

    try:
        return load_network(path, dtype=dtype)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: no such model file: {path}") from None


def _model_info(path: str) -> dict:
    from .checkpoint import read_metadata
    from .interop.official import is_official_pickle, snapshot_metadata

    meta = snapshot_metadata(path) if is_official_pickle(path) else read_metadata(path)
    return dict(path=str(Path(path).resolve()), nimg=meta.get("nimg"), ema_std=meta.get("ema_std"))


def _preset_models(args: argparse.Namespace) -> None:
    # --preset NAME --models DIR: the official files by their names, and the preset's weight.
    from .interop import presets

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


def _models_and_guidance(args: argparse.Namespace):
    """The main model, the guidance and the manifest entries from the model flags of ``generate``
    (also ``metrics gen``)."""
    from .guidance import CFG, Autoguidance, Combined

    if args.preset:
        _preset_models(args)
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
    net = _load_model(args.net, "--net", dtype)
    guide = _load_model(args.guide, "--guide", dtype) if args.guide else None
    uncond = _load_model(args.cfg, "--cfg", dtype) if args.cfg else None
    interval = _floats(args.interval) if args.interval else None
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
    models = {key: _model_info(p) for key, p in sources if p}
    guidance_info = None
    if guidance is not None:
        guidance_info = dict(
            kind=type(guidance).__name__,
            weight=guidance.weight,
            interval=guidance.interval,
            alpha=getattr(guidance, "alpha", None),
        )
    return net, guidance, models, guidance_info


def _sampler_options(args: argparse.Namespace) -> dict:
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


def _generate(args: argparse.Namespace) -> int:
    from . import __version__
    from .generation import compact_seeds, generate, parse_seeds, write_outputs

    seeds = parse_seeds(args.seeds)
    out = Path(args.out)
    _check_not_input(
        out, ("--net", args.net), ("--guide", args.guide), ("--cfg", args.cfg), ("--vae", args.vae)
    )
    if out.suffix != ".npz" and out.exists() and not out.is_dir():
        raise ValueError(f"out must be a directory or a .npz path, got the file {out}")
    if out.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".safetensors", ".pkl") and not out.is_dir():
        raise ValueError(f"--out must be a directory of PNGs or a .npz file, got {out}")
    device = init_process_group()  # under torchrun: the process group, this rank's device
    net, guidance, models, guidance_info = _models_and_guidance(args)
    sampler = _sampler_options(args)
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
    batches = generate(
        net,
        seeds,
        guidance=guidance,
        class_idx=args.class_idx,
        batch=args.batch,
        vae=args.vae,
        device=device,
        progress=not args.no_progress,
        **sampler,
    )
    write_outputs(batches, out, manifest, subdirs=args.subdirs)
    return 0


def _detectors(args: argparse.Namespace, device) -> dict:
    from .metrics import DETECTORS, detector

    names = [m.strip() for m in args.metrics.split(",") if m.strip()]
    bad = [m for m in names if m not in DETECTORS]
    if not names or bad or len(set(names)) != len(names):
        raise ValueError(f"--metrics must be distinct names from {','.join(DETECTORS)}, got {args.metrics!r}")
    files = {"fid": args.inception, "fd_dinov2": args.dinov2}
    return {m: detector(m, files[m], device) for m in names}


def _report(args: argparse.Namespace, result: dict) -> None:
    import torch.distributed as dist

    from .checkpoint import atomic_write_bytes, strict_json

    if dist.is_initialized() and dist.get_rank() != 0:
        return
    line = "  ".join(f"{k} {v:.6g}" for k, v in result.items() if k != "num_images")
    print(f"{line}  ({result['num_images']} images)")
    if args.out:
        atomic_write_bytes(args.out, (strict_json(result, indent=2) + "\n").encode())


def _check_not_input(out, *inputs) -> None:
    """An output that names one of the command's inputs would overwrite it: refused."""
    if not out:
        return
    o = Path(out).resolve()
    for flag, given in inputs:
        if given and Path(given).exists() and Path(given).resolve() == o:
            raise ValueError(f"--out {out} is the {flag} input: it would be overwritten; give another --out")


def _check_outputs(*paths) -> None:
    from .checkpoint import check_replaceable

    for p in paths:
        if p:
            check_replaceable(Path(p))


def _metrics_ref(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from .metrics import image_stats, save_ref

    if Path(args.out).suffix.lower() not in (".pkl", ".npz"):
        raise ValueError(f"--out must be a .pkl (the official layout) or an .npz file, got {args.out}")
    _check_outputs(args.out)
    _check_not_input(args.out, ("--data", args.data))
    device = init_process_group()
    detectors = _detectors(args, device)
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
    from .metrics import image_stats, load_ref, metrics_from_stats

    _check_outputs(args.out)
    _check_not_input(args.out, ("--images", args.images), ("--ref", args.ref))
    ref = load_ref(args.ref)  # checked before any image is read
    device = init_process_group()
    detectors = _detectors(args, device)
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
    _report(args, {**metrics_from_stats(stats, ref), "num_images": stats["num_images"]})
    return 0


def _metrics_gen(args: argparse.Namespace) -> int:
    from .generation import generate, parse_seeds
    from .metrics import load_ref, metrics_from_stats, stats_of_batches

    _check_outputs(args.out)
    _check_not_input(
        args.out, ("--ref", args.ref), ("--net", args.net), ("--guide", args.guide), ("--cfg", args.cfg)
    )
    ref = load_ref(args.ref)
    seeds = parse_seeds(args.seeds) if args.seeds else list(range(args.seed, args.seed + args.num))
    device = init_process_group()
    net, guidance, _, _ = _models_and_guidance(args)
    detectors = _detectors(args, device)
    batches = generate(
        net,
        seeds,
        guidance=guidance,
        class_idx=args.class_idx,
        batch=args.batch,
        vae=args.vae,
        device=device,
        **_sampler_options(args),
    )
    stats = stats_of_batches(
        (b.images for b in batches), detectors, device=device, total=len(seeds), progress=not args.no_progress
    )
    _report(args, {**metrics_from_stats(stats, ref), "num_images": stats["num_images"]})
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .interop.official import convert

    _check_not_input(args.out, ("src", args.src))
    for p in convert(args.src, args.out):
        print(p)
    return 0


def _presets(args: argparse.Namespace) -> int:
    from .interop import presets

    print(presets.table(kind=args.kind))
    print(f"\nFiles: {presets.MODEL_ROOT}/<net or gnet>. Use: autoguide generate --preset NAME --models DIR")
    return 0


def _read_images(path: Path):
    """uint8 images [N, C, H, W] and their classes [N] (None unless every image has one) from a
    directory of PNGs written by ``autoguide generate`` (class in a text chunk) or an .npz."""
    import numpy as np
    import torch

    from .data import load_dataset, read_png

    if not path.exists():
        raise FileNotFoundError(f"--images {path}: no such directory or .npz file")
    if path.suffix == ".npz" and not path.is_dir():
        ds = load_dataset(path)  # checks the file: 'images' present, uint8, integer labels
        return ds.images, ds.labels
    if not path.is_dir():
        raise ValueError(f"--images must be a directory of PNGs or an .npz file, got the file {path}")
    files = [f for f in sorted(path.rglob("*.png")) if f.name != "grid.png" and f.is_file()]
    if not files:
        raise ValueError(f"--images {path}: the directory holds no PNG images")
    arrays, classes = [], []
    for f in files:
        arr, text = read_png(f.read_bytes(), str(f))
        if arrays and arr.shape != arrays[0].shape:
            raise ValueError(f"{f}: image of shape {arr.shape}, but {files[0]} has {arrays[0].shape}")
        c = text.get("class")
        if c is not None and not c.strip().isdigit():
            raise ValueError(f"{f}: its 'class' text chunk must be a class number, got {c!r}")
        arrays.append(arr)
        classes.append(None if c is None else int(c))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    known = None if any(c is None for c in classes) else torch.tensor(classes, dtype=torch.int64)
    return images, known


def _eval(args: argparse.Namespace) -> int:
    import numpy as np

    from . import digits
    from .checkpoint import atomic_path, atomic_write_bytes, check_replaceable, strict_json

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
        path = Path(args.images)
        images, classes = _read_images(path)
        if len(images) < 4:  # k-NN precision and recall with k = 3
            raise ValueError(f"{path}: eval needs at least 4 images, got {len(images)}")
        if tuple(images.shape[1:]) != (1, 8, 8):
            raise ValueError(
                f"{path}: eval measures 8x8 grey digits, got images [N, C, H, W] = {tuple(images.shape)}"
            )
        if classes is not None and (int(classes.min()) < 0 or int(classes.max()) > 9):
            raise ValueError(
                f"{path}: classes must be digits 0..9, got {int(classes.min())}..{int(classes.max())}"
            )
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
    from .checkpoint import check_replaceable, save
    from .digits import train_classifier

    if args.epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {args.epochs}")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be in [0, 2**63), got {args.seed}")
    out = Path(args.out)
    check_replaceable(out)  # before training, not after
    parent = next(p for p in out.absolute().parents if p.exists())
    if not parent.is_dir():
        raise NotADirectoryError(f"--out {out}: {parent} is a file, not a directory")
    net, acc = train_classifier(epochs=args.epochs, seed=args.seed, progress=not args.no_progress)
    save(net.state_dict(), out, dict(test_accuracy=str(acc)))  # atomic
    print(f"held-out accuracy {acc:.4f}; wrote {out}")
    return 0


def _experiment(args: argparse.Namespace) -> int:
    if args.name == "digits-seeds":
        from .digits_study import digits_seeds

        digits_seeds(args.out or "runs/digits-seeds", seeds=args.seeds, quick=args.quick)
        return 0
    from .experiment import digits_experiment

    digits_experiment(args.out or "runs/digits", quick=args.quick)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from .experiment import parse_weights, sweep
    from .generation import parse_seeds

    weights = parse_weights(args.weights, "--weights")
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    # sweep checks the rest (models, EMA lengths, --out) before it creates anything.
    detector = {"fid": args.inception, "fd_dinov2": args.dinov2}.get(args.metric)
    sweep(
        args.main,
        args.guide,
        weights,
        args.out,
        ema_main=args.ema_main,
        ema_guide=args.ema_guide,
        guide_kimg=args.guide_kimg,
        seeds=parse_seeds(args.seeds),
        steps=args.steps,
        metric=args.metric,
        ref=args.ref,
        detector=detector,
    )
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--interval", help="guidance interval lo,hi in sigma units")


def _add_sampler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=32, help="sampler steps (Heun; the last one Euler)")
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


def _add_metrics(sub) -> None:
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
        p.add_argument("--batch", type=int, default=batch, help="images per batch and process")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    ref = ms.add_parser("ref", help="reference statistics of a data set (all its images by default)")
    ref.add_argument("--data", required=True, help="folder, .zip or .npz of images")
    ref.add_argument("--out", required=True, help="statistics file: .pkl (official layout) or .npz")
    ref.add_argument("--num", type=int, default=None, help="use this many images (default: all)")
    ref.add_argument("--workers", type=int, default=2, help="image decoding processes")
    common(ref, 64)
    ref.set_defaults(func=_metrics_ref)

    calc = ms.add_parser("calc", help="metrics of a folder, .zip or .npz of images against a reference")
    calc.add_argument("--images", required=True, help="folder, .zip or .npz of images")
    calc.add_argument("--ref", required=True, help="reference statistics (.pkl official layout, or .npz)")
    calc.add_argument("--num", type=int, default=50000, help="images to use, a seeded subset if more")
    calc.add_argument("--seed", type=int, default=0, help="seed of the subset")
    calc.add_argument("--workers", type=int, default=2, help="image decoding processes")
    calc.add_argument("--out", help="also write the result as JSON to this file")
    common(calc, 64)
    calc.set_defaults(func=_metrics_calc)

    gen = ms.add_parser("gen", help="generate and measure without writing images (as the official gen)")
    gen.add_argument("--ref", required=True, help="reference statistics (.pkl official layout, or .npz)")
    gen.add_argument("--num", type=int, default=50000, help="images: seeds --seed .. --seed + num - 1")
    gen.add_argument("--seed", type=int, default=0, help="first seed")
    gen.add_argument("--seeds", default=None, help="explicit seeds instead, e.g. 0-9999")
    gen.add_argument(
        "--class", dest="class_idx", type=int, default=None, help="class (default: random per seed)"
    )
    gen.add_argument("--out", help="also write the result as JSON to this file")
    _add_model_args(gen)
    _add_sampler_args(gen)
    common(gen, 32)
    gen.set_defaults(func=_metrics_gen)


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
    parser = _Parser(prog="autoguide", description="Autoguidance for diffusion models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also AUTOGUIDE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    toy = sub.add_parser(
        "toy",
        help="the paper's 2D toy experiment: train three models, sample with no guidance, CFG and "
        "autoguidance, print metrics, write a figure",
    )
    toy.add_argument("--out", default="runs/toy", help="run directory (models are reused from it)")
    toy.add_argument(
        "--seeds",
        type=int,
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
    tr.add_argument("--workers", type=int, default=2, help="data loading processes when streaming")
    tr.add_argument("--preset", default="digits-s", help="network preset (see networks.PRESETS)")
    tr.add_argument("--out", required=True, help="run directory")
    tr.add_argument(
        "--kimg",
        type=float,
        default=None,
        help="training length in thousands of images (default: 200, or an edm2-* preset's official length)",
    )
    tr.add_argument(
        "--batch", type=int, default=None, help="total batch size (default: 128, edm2-* presets 2048)"
    )
    tr.add_argument("--batch-gpu", type=int, default=None, help="per-process batch per accumulation round")
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
    tr.add_argument("--ema", type=_floats, default=(0.05, 0.10), help="EMA widths, e.g. 0.05,0.10")
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
    tr.add_argument("--seed", type=int, default=0, help="seed of the initialisation, data order and noise")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.set_defaults(func=_train)

    em = sub.add_parser("ema", help="post-hoc EMA: reconstruct EMA widths from a run's snapshots")
    em.add_argument("--snapshots", help="run directory with network snapshots")
    em.add_argument("--std", type=_floats, help="EMA widths to reconstruct, e.g. 0.05,0.07,0.10")
    em.add_argument("--nimg", type=int, default=None, help="training time to reconstruct (default: newest)")
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

    ge = sub.add_parser(
        "generate",
        help="generate images from seeds (autoguidance, CFG or both); official EDM2 .pkl files are read "
        "safely, as are the official presets",
    )
    _add_model_args(ge)
    _add_sampler_args(ge)
    ge.add_argument("--seeds", default="0-63", help="e.g. 0-9999 or 1,5,7-9")
    ge.add_argument(
        "--class", dest="class_idx", type=int, default=None, help="class (default: random per seed)"
    )
    ge.add_argument(
        "--batch", type=int, default=64, help="images per sampler call (images do not depend on it)"
    )
    ge.add_argument("--out", required=True, help="directory of PNGs, or a .npz file")
    ge.add_argument("--subdirs", action="store_true", help="one subdirectory per 1000 seeds")
    ge.add_argument("--no-progress", action="store_true", help="no progress bar")
    ge.set_defaults(func=_generate)

    co = sub.add_parser(
        "convert",
        help="official EDM2 pickle(s) -> safetensors snapshot(s) (read safely: nothing in the pickle runs)",
    )
    co.add_argument("src", help="an official .pkl, or a folder of them (e.g. raw training snapshots)")
    co.add_argument("--out", required=True, help="output .safetensors file, or folder")
    co.set_defaults(func=_convert)

    pr = sub.add_parser("presets", help="the official EDM2 generation presets, with the paper's FID")
    pr.add_argument("--kind", choices=["none", "cfg", "autoguidance"], help="only presets of this kind")
    pr.set_defaults(func=_presets)

    ev = sub.add_parser(
        "eval", help="FD_digits (key fd), precision, recall and alignment of generated digits, as JSON"
    )
    ev.add_argument("--images", help="directory of PNGs (from autoguide generate) or .npz")
    ev.add_argument("--ref", default="digits", help="'digits' or reference statistics from --save-ref")
    ev.add_argument("--save-ref", help="write the reference statistics (an .npz archive) to this file")
    ev.add_argument("--out", help="also write the metrics as JSON to this file")
    ev.set_defaults(func=_eval)

    cl = sub.add_parser("classifier", help="train the digits feature classifier (ships with the package)")
    cl.add_argument("--out", required=True, help="where to save its weights (.safetensors)")
    cl.add_argument("--epochs", type=int, default=40, help="training epochs (>= 1)")
    cl.add_argument("--seed", type=int, default=0, help="seed of the initialisation and batches (>= 0)")
    cl.add_argument("--no-progress", action="store_true", help="no progress bar")
    cl.set_defaults(func=_classifier)

    ex = sub.add_parser(
        "experiment",
        help="the digits guidance experiment (digits), or the same over training seeds with a guide search "
        "(digits-seeds)",
    )
    ex.add_argument("name", choices=["digits", "digits-seeds"], help="which experiment")
    ex.add_argument("--out", default=None, help="run directory (default: runs/<name>)")
    ex.add_argument("--seeds", type=int, default=3, help="digits-seeds: independent training sets")
    ex.add_argument("--quick", action="store_true", help="tiny sizes, for tests only")
    ex.set_defaults(func=_experiment)

    sw = sub.add_parser("sweep", help="autoguidance weight x EMA length sweep (resumable)")
    sw.add_argument("--main", required=True, help="main snapshot or run directory")
    sw.add_argument("--guide", required=True, help="guide snapshot or run directory")
    sw.add_argument(
        "--weights", default="1.5:3.0:0.25", help="lo:hi:step (hi included) or a comma list; at most 1000"
    )
    sw.add_argument("--ema-main", type=_floats, default=None, help="EMA lengths of the main model (post hoc)")
    sw.add_argument("--ema-guide", type=_floats, default=None, help="EMA lengths of the guide (post hoc)")
    sw.add_argument(
        "--guide-kimg",
        type=_floats,
        default=None,
        help="guide training lengths: the guide run reconstructed at these times (kimg), e.g. 7.5,15,30",
    )
    sw.add_argument("--seeds", default="0-499", help="the fixed seed set of every cell, e.g. 0-499")
    sw.add_argument("--steps", type=int, default=16, help="sampler steps per image")
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
    _add_metrics(sub)
    dataset_tool.add_cli(sub)
    return parser


# Errors of what the user gave (a file, a flag, a value): one line, exit 2. Anything else is a bug
# or an environment failure: one line too, exit 1; --debug (or AUTOGUIDE_DEBUG=1) shows tracebacks.
_INPUT_ERRORS = (ValueError, TypeError, LookupError, OSError, argparse.ArgumentTypeError)


def main(argv: list[str] | None = None) -> int:
    from ._core import AutoguideError

    args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
