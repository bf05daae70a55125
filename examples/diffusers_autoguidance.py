"""Autoguidance for a diffusers UNet: which guide, which weight (Karras et al. 2024, "Guiding a
Diffusion Model with a Bad Version of Itself").

The recipe: guide the main model D1 with a weaker model D0 of the same family that sees the same
conditioning -- smaller and/or trained for less time -- as D = D0 + w (D1 - D0), and pick the guide
and the weight w by a sweep over a fixed seed set. This script samples every (guide, weight) cell
with the package's EDM Heun sampler on the main model's training sigma range, decodes latents with
the pipeline's VAE and writes, under --out: grids/ (one grid per cell), contact_sheet.png (all of
them), table.md and cells.json (resumable: finished cells are reused) and, with --metric,
heatmap.png and the best cell.

Nothing is downloaded at run time: everything is read with from_pretrained(local_files_only=True).
Public pairs "main + smaller or earlier model of the same family" are rare; two that fit, for the
Stable Diffusion 1.x family (same text encoder and VAE, so the same prompt embeddings serve both):

    huggingface-cli download CompVis/stable-diffusion-v1-4 --local-dir sd14        # main pipeline
    huggingface-cli download nota-ai/bk-sdm-small --include "unet/*" --local-dir bk-sdm-small
    huggingface-cli download CompVis/stable-diffusion-v1-1 --include "unet/*" --local-dir sd11

bk-sdm-small is SD 1.4's UNet with blocks removed, distilled from it (the "smaller" guide; also
nota-ai/bk-sdm-tiny); stable-diffusion-v1-1 is an earlier training stage of the same line (the
"shorter-trained" guide; v1-2, v1-4 and v1-5 continue from it). For your own models the paper's
guide is simplest to make: an earlier checkpoint of your own training or fine-tuning run, or a
smaller UNet trained the same way on the same data and conditioning.

Prompt embeddings (text-to-image UNets) come from your pipeline, in an environment that has
transformers (this script needs no text encoder):

    pipe = StableDiffusionPipeline.from_pretrained("sd14")
    emb, _ = pipe.encode_prompt("a photo of a corgi", "cpu", 1, False)
    safetensors.torch.save_file({"encoder_hidden_states": emb.contiguous()}, "prompt.safetensors")

(an SDXL pipeline adds "text_embeds" and "time_ids" to the same file: they are passed as
added_cond_kwargs). Class-conditional UNets take --class-label, or draw a class per seed.

    python examples/diffusers_autoguidance.py --main sd14 --guide bk-sdm-small/unet \\
        --guide sd11/unet --embeddings prompt.safetensors --weights 1.5,2,2.5,3 --seeds 0-63 \\
        --steps 32 --out runs/sd14-autoguidance

Scores: there is no general image metric without a download, so none is built in; compare the
grids, or plug your own (e.g. an FID against your reference images) with --metric
MODULE:FUNCTION, a function (images uint8 [N, C, H, W], classes [N] or None) -> {name: number},
and --objective NAME (--maximize if larger is better). Use many seeds (thousands) for an FID.

--tiny builds tiny random models into a temporary folder (saved and loaded like real ones) and runs
the same path in seconds on a CPU; its images are noise.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import re
import sys
import tempfile
from pathlib import Path

import torch

UNET_CLASSES = ("UNet2DConditionModel", "UNet2DModel")


def unet_folder(path: Path) -> Path:
    """A UNet folder (config.json) or a pipeline folder holding one (unet/config.json)."""
    if (path / "config.json").is_file():
        return path
    if (path / "unet" / "config.json").is_file():
        return path / "unet"
    raise SystemExit(f"error: {path} is neither a UNet folder (config.json) nor a pipeline folder (unet/)")


def load_unet(path: Path, dtype: torch.dtype, device: str) -> torch.nn.Module:
    import diffusers

    folder = unet_folder(path)
    name = json.loads((folder / "config.json").read_text()).get("_class_name")
    if name not in UNET_CLASSES:
        raise SystemExit(f"error: {folder} holds a {name!r}, not one of {UNET_CLASSES}")
    unet = getattr(diffusers, name).from_pretrained(
        folder, local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=False
    )
    return unet.to(device).eval().requires_grad_(False)


def load_scheduler(pipeline: Path):
    import diffusers

    config = pipeline / "scheduler" / "scheduler_config.json"
    if not config.is_file():
        raise SystemExit(f"error: {pipeline} has no scheduler/scheduler_config.json (a pipeline folder?)")
    name = json.loads(config.read_text()).get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if cls is None or not name.endswith("Scheduler"):
        raise SystemExit(f"error: {config} names an unknown scheduler {name!r}")
    return cls.from_pretrained(pipeline, subfolder="scheduler", local_files_only=True)


def load_conditioning(path: Path | None) -> dict:
    """Keyword arguments for every UNet call, from a safetensors file of prompt embeddings."""
    if path is None:
        return {}
    from safetensors.torch import load_file

    tensors = load_file(path)
    if "encoder_hidden_states" not in tensors:
        raise SystemExit(f"error: {path} has no 'encoder_hidden_states' (it has {sorted(tensors)})")
    cond = {"encoder_hidden_states": tensors["encoder_hidden_states"]}
    added = {k: tensors[k] for k in ("text_embeds", "time_ids") if k in tensors}
    if added:
        cond["added_cond_kwargs"] = added
    return cond


def file_identity(path: Path) -> list:
    """What identifies a model folder or file in the sweep's cache: names, sizes, mtimes."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def guide_names(specs: list[str]) -> dict[str, Path]:
    """'DIR' or 'NAME=DIR' -> {name: folder}; a default name is the folder's (its parent's for unet/)."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        path = Path(folder if sep else spec)
        if not sep:
            name = (path.parent if path.name == "unet" else path).resolve().name
        name = re.sub(r"[^A-Za-z0-9._-]", "-", name)[:60] or "guide"
        base, k = name, 2
        while name in out:
            name, k = f"{base}-{k}", k + 1
        out[name] = path
    return out


def load_metric(spec: str | None):
    if spec is None:
        return None
    module, sep, func = spec.partition(":")
    if not sep:
        raise SystemExit(f"error: --metric must be MODULE:FUNCTION, got {spec!r}")
    return getattr(importlib.import_module(module), func)


def build_tiny(root: Path) -> tuple[Path, list[str], Path]:
    """Tiny random stand-ins saved like downloaded checkpoints: a latent text-conditioned pipeline
    (unet/, scheduler/, vae/), a smaller guide and an "earlier checkpoint" guide, and embeddings."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file

    def unet(seed: int, width: int) -> UNet2DConditionModel:
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(width, 2 * width),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16,
            attention_head_dim=4,
            norm_num_groups=8,
        )

    pipe = root / "tiny-pipeline"
    unet(0, 32).save_pretrained(pipe / "unet")
    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").save_pretrained(
        pipe / "scheduler"
    )
    torch.manual_seed(1)
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=8,
    ).save_pretrained(pipe / "vae")
    unet(2, 16).save_pretrained(root / "guide-small" / "unet")
    unet(3, 32).save_pretrained(root / "guide-early" / "unet")
    embeddings = root / "prompt.safetensors"
    save_file(
        {"encoder_hidden_states": torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(4))},
        embeddings,
    )
    return pipe, [str(root / "guide-small"), str(root / "guide-early")], embeddings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--main", type=Path, help="main model: a diffusers pipeline folder (unet/, scheduler/, vae/)"
    )
    p.add_argument(
        "--guide",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="a guide UNet folder (or a pipeline folder); repeat for several",
    )
    p.add_argument(
        "--weights", default=None, help="guidance weights: 'w1,w2,...' or 'lo:hi:step' (default 1.5,2,2.5,3)"
    )
    p.add_argument(
        "--seeds",
        default=None,
        help="seeds, e.g. '0-63' (one image each, the same in every cell; default 0-15)",
    )
    p.add_argument("--steps", type=int, default=None, help="Heun steps (default 32)")
    p.add_argument("--batch", type=int, default=8, help="images per sampler call")
    p.add_argument("--out", type=Path, default=Path("runs/diffusers_autoguidance"), help="output folder")
    p.add_argument("--embeddings", type=Path, help="safetensors file with encoder_hidden_states [1, L, C]")
    p.add_argument(
        "--class-label", type=int, help="class index for a class-conditional UNet (default: per seed)"
    )
    p.add_argument("--vae", type=Path, help="VAE folder (default: MAIN/vae when it exists)")
    p.add_argument("--metric", help="MODULE:FUNCTION scoring a cell's images (see above); default: none")
    p.add_argument("--objective", default="fd", help="the metric value that picks the best cell")
    p.add_argument("--maximize", action="store_true", help="larger objective is better")
    p.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        help="UNet dtype (default: float16 on CUDA, else float32; the VAE: float32)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="tiny random models in a temporary folder (a smoke test, ~10 s on 2 CPU cores)",
    )
    args = p.parse_args(argv)
    # --tiny is a smoke test: 2 guides x 2 weights x 4 seeds x 8 steps (~10 s on 2 CPU cores)
    # unless given otherwise; real models keep the full defaults.
    small = dict(weights="2,3", seeds="0-3", steps=8) if args.tiny else {}
    for name, full in (("weights", "1.5,2,2.5,3"), ("seeds", "0-15"), ("steps", 32)):
        if getattr(args, name) is None:
            setattr(args, name, small.get(name, full))

    from diffusers import AutoencoderKL

    from autoguide_fast.adapters.diffusers import denoiser
    from autoguide_fast.checks import parse_seeds, parse_weights
    from autoguide_fast.studies.sweep import sweep_denoisers

    try:
        weights, seeds = parse_weights(args.weights), parse_seeds(args.seeds)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    metric = load_metric(args.metric)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            args.main, args.guide, args.embeddings = build_tiny(Path(tmp))
        if args.main is None or not args.guide:
            p.error("--main and at least one --guide are required (or --tiny)")
        dtype = getattr(torch, args.dtype or ("float16" if args.device.startswith("cuda") else "float32"))
        scheduler = load_scheduler(args.main)
        cond = load_conditioning(args.embeddings)
        main_net = denoiser(load_unet(args.main, dtype, args.device), scheduler, **cond)
        guides = {
            name: denoiser(load_unet(path, dtype, args.device), scheduler, **cond)
            for name, path in guide_names(args.guide).items()
        }
        vae_dir = args.vae or (args.main / "vae" if (args.main / "vae" / "config.json").is_file() else None)
        vae = None
        if vae_dir is not None:
            vae = AutoencoderKL.from_pretrained(
                vae_dir, local_files_only=True, torch_dtype=torch.float32, low_cpu_mem_usage=False
            )
            vae = vae.to(args.device).eval().requires_grad_(False)
        # The cache knows in-memory models only by this identity: the checkpoints' files, the
        # conditioning and the dtype (not the temporary --tiny folder, whose files are new each run).
        identity = dict(
            main="tiny" if args.tiny else file_identity(unet_folder(args.main)),
            guides={
                n: "tiny" if args.tiny else file_identity(unet_folder(Path(g)))
                for n, g in guide_names(args.guide).items()
            },
            embeddings=None if args.embeddings is None else digest(args.embeddings),
            vae=None if vae_dir is None or args.tiny else file_identity(Path(vae_dir)),
            dtype=str(dtype),
        )
        best = sweep_denoisers(
            main_net,
            guides,
            weights,
            seeds,
            args.out,
            identity=identity,
            metric=metric,
            objective=args.objective,
            minimize=not args.maximize,
            steps=args.steps,
            batch=args.batch,
            class_idx=args.class_label,
            vae=vae,
            device=args.device,
        )
    print(f"wrote {args.out / 'table.md'} and {args.out / 'contact_sheet.png'}")
    if best is None:
        print("no metric: compare the grids (contact_sheet.png), or pass --metric MODULE:FUNCTION")
    else:
        score = best[args.objective]
        print(f"best: guide {best['guide']}, weight {best['weight']:g}, {args.objective} {score:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
