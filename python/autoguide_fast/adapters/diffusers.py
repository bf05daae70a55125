"""diffusers UNets as EDM denoisers, as k-diffusion's discrete wrappers do it.

A discrete-time UNet trained with ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` sees, after
division by ``sqrt(abar_t)``, the EDM state ``x = x0 + sigma_t eps`` with
``sigma_t = sqrt((1 - abar_t) / abar_t)`` (Karras et al. 2022, Table 1, "VP"). So the denoiser is

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, t(sigma)),  c_in = 1 / sqrt(sigma^2 + 1)

with ``t(sigma)`` the training timestep of ``sigma`` (linear in log-sigma between grid points) and,
writing ``a = c_in`` (so the model input is ``a x = a x0 + a sigma eps`` and ``a^2 + (a sigma)^2 = 1``):

- ``epsilon``:      F = eps,                       D = x - sigma F
- ``v_prediction``: F = a eps - a sigma x0,        D = a^2 x - a sigma F  (x0 = a (a x) - (a sigma) v)
- ``sample``:       F = x0,                        D = F
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..interop.vae import EncoderInfo

__all__ = ["PREDICTION_TYPES", "DiffusersDenoiser", "denoiser"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _alphas_cumprod(scheduler) -> torch.Tensor:
    abar = getattr(scheduler, "alphas_cumprod", None)
    if abar is None:
        betas = getattr(scheduler, "betas", None)
        if betas is None:
            raise TypeError(
                f"scheduler must have alphas_cumprod or betas (a diffusers training scheduler such as "
                f"DDPMScheduler), got {type(scheduler).__name__}"
            )
        abar = torch.cumprod(1 - torch.as_tensor(betas, dtype=torch.float64), 0)
    abar = torch.as_tensor(abar).to(torch.float64).flatten()
    if abar.numel() < 2 or not bool(((abar > 0) & (abar < 1)).all()):
        raise ValueError(
            f"scheduler.alphas_cumprod must hold at least 2 values in (0, 1), got {abar.numel()} values "
            f"in [{abar.min().item():.3g}, {abar.max().item():.3g}]"
        )
    return abar


def _check_conditioning(name: str, value):
    if isinstance(value, Mapping):
        return {k: _check_conditioning(f"{name}[{k!r}]", v) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        raise ValueError(f"conditioning {name} must have a batch dimension [B, ...], got a 0-d tensor")
    return value


def _batch_sizes(name: str, value) -> dict[str, int]:
    # {name: B} of every conditioning tensor with a batch of more than 1 (per-sample rows).
    if isinstance(value, dict):
        return {n: b for k, v in value.items() for n, b in _batch_sizes(f"{name}[{k!r}]", v).items()}
    if isinstance(value, torch.Tensor) and value.shape[0] != 1:
        return {name: value.shape[0]}
    return {}


def _image_shape(unet, resolution, latent) -> tuple[int | None, int | None, bool]:
    """(channels, resolution, latent) of the images the UNet makes, from its config and the
    adapter options; None where the UNet does not say."""
    config = getattr(unet, "config", None)
    channels = getattr(config, "in_channels", None)
    channels = channels if isinstance(channels, int) and not isinstance(channels, bool) else None
    if latent is not None and not isinstance(latent, bool):
        raise TypeError(f"latent must be None, True or False, got {latent!r}")
    if latent is None:
        latent = channels == 4  # the Stable Diffusion family's VAE latents
    if resolution is not None:
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution must be a positive integer (square images), got {resolution!r}")
        return channels, resolution, latent
    size = getattr(config, "sample_size", None)
    if isinstance(size, (tuple, list)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if isinstance(size, (tuple, list)):
        raise ValueError(
            f"unet.config.sample_size is {tuple(size)}, not square: the package generates square images; "
            "pass resolution=N to denoiser(...) (the side, in the UNet's sample space) to choose one"
        )
    size = size if isinstance(size, int) and not isinstance(size, bool) else None
    return channels, size, latent


def _batched(name: str, value, n: int):
    # A batch of 1 serves every sample (a view, no copy); a batch of n is taken as is.
    if isinstance(value, dict):
        return {k: _batched(f"{name}[{k!r}]", v, n) for k, v in value.items()}
    if not isinstance(value, torch.Tensor) or value.shape[0] == n:
        return value
    if value.shape[0] == 1:
        return value.expand(n, *value.shape[1:])
    raise ValueError(
        f"conditioning {name} has batch size {value.shape[0]}, but the denoiser was called with "
        f"{n} samples; pass a batch of 1 (shared by all samples) or of {n}"
    )


def _moved(value, device: torch.device, dtype: torch.dtype):
    if isinstance(value, dict):
        return {k: _moved(v, device, dtype) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype) if value.is_floating_point() else value.to(device)
    return value


class DiffusersDenoiser(torch.nn.Module):
    """A diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` as an EDM denoiser; see :func:`denoiser`.

    Attributes:
        unet: the wrapped UNet (a submodule: ``.to()``, ``.eval()`` reach it).
        prediction_type: "epsilon", "v_prediction" or "sample".
        sigmas: float64 [T], the training grid ``sigma_t``, increasing in ``t``.
        sigma_min, sigma_max: the grid's ends, the model's declared range: :func:`autoguide_fast.sample`
            and ``generate`` limit EDM's 0.002 / 80 to it when no sigma range is given.
        conditioning: the keyword arguments given to every UNet call.
        conditioning_batch: B of the per-sample conditioning tensors (batch > 1), or 1 when every
            conditioning tensor is shared by all samples.
        label_dim: the number of classes when the UNet has a class-embedding table and
            ``class_labels`` is not carried (labels are then one-hot [N, label_dim]); else None.
        img_channels: ``unet.config.in_channels`` (None when the UNet has no config).
        img_resolution: the side of the square samples ``generate`` draws: ``resolution`` given to
            :func:`denoiser`, else ``unet.config.sample_size``. Only a default: :func:`sample`
            takes any size the UNet does (``img_resolution_fixed`` is False).
        encoder: how samples become pixels (:class:`~autoguide_fast.interop.vae.EncoderInfo`):
            ``diffusers_vae`` for a latent UNet (decoded by the pipeline's ``AutoencoderKL``),
            ``standard_rgb`` for a pixel UNet (samples in [-1, 1]).
    """

    img_resolution_fixed = False

    def __init__(
        self,
        unet: torch.nn.Module,
        alphas_cumprod: torch.Tensor,
        prediction_type: str,
        conditioning,
        resolution: int | None = None,
        latent: bool | None = None,
    ):
        super().__init__()
        self.img_channels, self.img_resolution, is_latent = _image_shape(unet, resolution, latent)
        self.encoder = EncoderInfo("diffusers_vae" if is_latent else "standard_rgb")
        batches = {n: b for k, v in conditioning.items() for n, b in _batch_sizes(k, v).items()}
        if len(set(batches.values())) > 1:
            raise ValueError(
                "conditioning tensors must have a batch of 1 (shared) or one common batch size, "
                f"got {batches}"
            )
        self.conditioning_batch = next(iter(batches.values()), 1)
        self.unet = unet
        self.prediction_type = prediction_type
        # Plain float64 attributes, not buffers: ``.half()`` on the wrapper must not round the grid.
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().cpu()
        self.sigmas, self.log_sigmas = sigmas, sigmas.log()
        self._grids = {self.log_sigmas.device: self.log_sigmas}
        self.sigma_min, self.sigma_max = float(sigmas[0]), float(sigmas[-1])
        self.conditioning = conditioning
        embedding = getattr(unet, "class_embedding", None)
        self._class_table = isinstance(embedding, torch.nn.Embedding)
        self._class_conditional = embedding is not None and "class_labels" not in conditioning
        self.label_dim = embedding.num_embeddings if self._class_table and self._class_conditional else None
        # Labels the caller must pass that generate cannot draw (a class embedding that is not a table).
        self.labels_required = self._class_conditional and not self._class_table

    def _grid(self, device: torch.device) -> torch.Tensor:
        if device not in self._grids:
            self._grids[device] = self.log_sigmas.to(device)
        return self._grids[device]

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous training timestep of ``sigma`` (any shape; float64 of the same shape, on
        ``sigma``'s device): linear in log-sigma between grid points, clamped to ``[0, T - 1]``
        outside the grid (as diffusers' and k-diffusion's discrete schedulers do)."""
        sigma = torch.as_tensor(sigma)
        grid = self._grid(sigma.device)
        log_sigma = sigma.to(torch.float64).clamp_min(1e-300).log()
        low = (torch.searchsorted(grid, log_sigma) - 1).clamp(0, len(grid) - 2)
        lo, hi = grid[low], grid[low + 1]
        return low + ((log_sigma - lo) / (hi - lo)).clamp(0, 1)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`sigma_to_t` on ``[0, T - 1]`` (float64, same shape and device as ``t``)."""
        t = torch.as_tensor(t)
        grid = self._grid(t.device)
        t = t.to(torch.float64).clamp(0, len(grid) - 1)
        low = t.floor().long().clamp(max=len(grid) - 2)
        return grid[low].lerp(grid[low + 1], t - low).exp()

    def _class_labels(self, labels: torch.Tensor | None, n: int):
        if labels is None:
            if self._class_conditional:
                raise ValueError(
                    "labels are required: the UNet is class-conditional and the denoiser carries no "
                    "class_labels"
                )
            return {}
        if not self._class_conditional:
            why = "carries class_labels" if "class_labels" in self.conditioning else "has no class embedding"
            raise ValueError(
                f"labels must be None: the UNet {why} (conditioning is carried by the denoiser; "
                f"got labels of shape {tuple(labels.shape)})"
            )
        if labels.ndim != 2 or labels.shape[0] != n:
            raise ValueError(f"labels must have shape [{n}, label_dim], got {tuple(labels.shape)}")
        if not self._class_table:
            return {"class_labels": labels}
        if labels.shape[1] != self.label_dim:
            raise ValueError(f"labels have {labels.shape[1]} columns, the UNet has {self.label_dim} classes")
        if not (bool(((labels == 0) | (labels == 1)).all()) and bool((labels.sum(1) == 1).all())):
            raise ValueError("labels must be one-hot: the UNet's class embedding is a table (nn.Embedding)")
        return {"class_labels": labels.argmax(1)}

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Denoised estimate [N, C, H, W] of ``x`` [N, C, H, W] at ``sigma`` (0-d or [N]), in ``x.dtype``."""
        n = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(n)
        if sigma.shape != (n,):
            raise ValueError(f"sigma must be 0-d or [{n}], got shape {tuple(sigma.shape)}")
        param = next(self.unet.parameters())
        kwargs = {k: _batched(k, v, n) for k, v in self.conditioning.items()}
        kwargs.update(self._class_labels(labels, n))
        kwargs = _moved(kwargs, param.device, param.dtype)

        work = torch.promote_types(x.dtype, torch.float32)
        s = sigma.to(work)[:, None, None, None]
        c_in = (s * s + 1).rsqrt()
        t = self.sigma_to_t(sigma).to(param.device, torch.float32)
        x_in = (x.to(work) * c_in).to(param.device, param.dtype)
        out = self.unet(x_in, t, **kwargs, return_dict=False)[0].to(x.device, work)
        if out.shape[1] == 2 * x.shape[1]:
            # A learned-variance UNet (variance_type "learned"/"learned_range", e.g. DeepFloyd IF)
            # outputs the prediction and the variance interpolation: the ODE needs the first half.
            out = out[:, : x.shape[1]]
        elif out.shape[1] != x.shape[1]:
            raise ValueError(
                f"the UNet returned {out.shape[1]} channels for {x.shape[1]} input channels (expected "
                f"{x.shape[1]}, or {2 * x.shape[1]} for a learned-variance UNet)"
            )
        xw = x.to(work)
        if self.prediction_type == "epsilon":
            d = xw - s * out
        elif self.prediction_type == "v_prediction":
            d = c_in * c_in * xw - c_in * s * out
        else:
            d = out
        return d.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"prediction_type={self.prediction_type!r}, sigma_min={self.sigma_min:.4g}, "
            f"sigma_max={self.sigma_max:.4g}, conditioning={sorted(self.conditioning)}"
        )


def denoiser(
    unet: torch.nn.Module,
    scheduler,
    *,
    resolution: int | None = None,
    latent: bool | None = None,
    null_class: int | None = None,
    **conditioning,
) -> DiffusersDenoiser:
    """Wraps a diffusers UNet and its training scheduler as an EDM denoiser ``D(x, sigma, labels=None)``.

    Args:
        unet: a ``UNet2DModel`` or ``UNet2DConditionModel`` (any module called as
            ``unet(sample, timestep, **conditioning, return_dict=False)[0]``); run in its own dtype
            and device.
        scheduler: the scheduler the UNet was trained with (for example ``DDPMScheduler``); its
            ``alphas_cumprod`` (or ``betas``) give the sigma grid and ``config.prediction_type`` the
            output parametrization.
        **conditioning: keyword arguments passed to every UNet call, for example
            ``encoder_hidden_states`` [B, L, C], ``added_cond_kwargs`` (a dict of [B, ...] tensors,
            SDXL) or ``class_labels`` [B]. ``B`` is 1 (shared by every sample) or the batch size
            the sampler uses. For CFG, wrap the same UNet a second time with the negative
            (or empty-prompt) embeddings.
        resolution, latent: adapter options, not passed to the UNet (no diffusers UNet takes
            keywords of these names). ``resolution``: the side of the square samples ``generate``
            draws (default ``unet.config.sample_size``, which must then be square; in the UNet's
            sample space: 64 for Stable Diffusion 1.x latents of 512-pixel images). ``latent``:
            whether samples are VAE latents, decoded by ``generate(..., vae=pipe.vae)``
            (default: True iff the UNet has 4 input channels, the Stable Diffusion family).
        null_class: for a class-conditional UNet trained with label dropout (DiT-style, a
            class-embedding table with one extra "no class" row): that row's index. The denoiser
            then always passes it and takes no labels (``label_dim`` 0), so it serves as the
            unconditional model of ``CFG(denoiser(unet, sched, null_class=1000), w)``.

    Returns:
        A :class:`DiffusersDenoiser`; ``sample(d, noise)`` and ``generate(d, seeds)`` without a
        sigma range stay on the training grid (``max(0.002, d.sigma_min)`` to ``min(80, d.sigma_max)``).
    """
    if not isinstance(unet, torch.nn.Module):
        raise TypeError(f"unet must be a torch.nn.Module (a diffusers UNet), got {type(unet)}")
    config = getattr(scheduler, "config", None)
    prediction_type = getattr(config, "prediction_type", None) if config is not None else None
    if prediction_type is None and isinstance(config, Mapping):
        prediction_type = config.get("prediction_type")
    if prediction_type not in PREDICTION_TYPES:
        named = getattr(config, "_class_name", None) or (config or {}).get("_class_name", "")
        if "FlowMatch" in type(scheduler).__name__ or "FlowMatch" in str(named):
            raise ValueError(
                f"{type(scheduler).__name__} is a flow-matching scheduler: flow-matching models "
                "(rectified flow, SD3, FLUX) are not supported yet, only diffusion UNets trained "
                "with epsilon, v_prediction or sample targets"
            )
        raise ValueError(
            f"scheduler.config.prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}"
        )
    for reserved in ("sample", "timestep", "return_dict"):
        if reserved in conditioning:
            raise ValueError(f"conditioning must not contain {reserved!r}: the denoiser sets it")
    if null_class is not None:
        table = getattr(unet, "class_embedding", None)
        if not isinstance(table, torch.nn.Embedding):
            raise ValueError("null_class needs a UNet whose class embedding is a table (nn.Embedding)")
        if isinstance(null_class, bool) or not isinstance(null_class, int):
            raise TypeError(f"null_class must be an integer class index, got {null_class!r}")
        if not 0 <= null_class < table.num_embeddings:
            raise ValueError(f"null_class must be in [0, {table.num_embeddings}), got {null_class}")
        if "class_labels" in conditioning:
            raise ValueError("give null_class or class_labels, not both")
        conditioning["class_labels"] = torch.tensor([null_class])
    conditioning = {k: _check_conditioning(k, v) for k, v in conditioning.items()}
    d = DiffusersDenoiser(unet, _alphas_cumprod(scheduler), prediction_type, conditioning, resolution, latent)
    if null_class is not None:
        d.label_dim = 0  # unconditional: what CFG asks of its guide
    return d
