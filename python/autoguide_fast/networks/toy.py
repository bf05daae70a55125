"""The 2D toy denoiser of the autoguidance paper (Karras et al. 2024, Section 3).

An MLP outputs an unnormalised log-density ``log p(x; sigma)``; its score is the gradient in
``x`` and the denoiser is ``D(x, sigma) = x + sigma^2 * score`` (Tweedie).
"""

from __future__ import annotations

import torch

from .mp import MPConv, MPSiLU

__all__ = ["ToyModel"]


class ToyModel(torch.nn.Module):
    """Log-density MLP for 2D data; ``model(x, sigma)`` is a denoiser.

    State-dict keys (``layers.{0,2,...}.weight``, ``gain``) equal the reference implementation's.
    """

    def __init__(
        self,
        in_dim: int = 2,  # Dimensionality of the data.
        num_layers: int = 4,  # Number of hidden layers (each MP-SiLU + MP-linear).
        hidden_dim: int = 64,  # Hidden features per layer.
        sigma_data: float = 0.5,  # Expected standard deviation of the training data.
    ):
        super().__init__()
        for name, v in (("in_dim", in_dim), ("num_layers", num_layers), ("hidden_dim", hidden_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data!r}")
        self.in_dim, self.num_layers, self.hidden_dim = in_dim, num_layers, hidden_dim
        self.sigma_data = float(sigma_data)
        self.layers = torch.nn.Sequential(MPConv(in_dim + 2, hidden_dim, kernel=()))
        for _ in range(num_layers):
            self.layers.append(MPSiLU())
            self.layers.append(MPConv(hidden_dim, hidden_dim, kernel=()))
        self.gain = torch.nn.Parameter(torch.zeros([]))

    @property
    def sample_shape(self) -> tuple[int]:
        """The shape of one sample: (in_dim,)."""
        return (self.in_dim,)

    @property
    def config(self) -> dict:
        """Constructor arguments (JSON-serialisable)."""
        return dict(
            in_dim=self.in_dim,
            num_layers=self.num_layers,
            hidden_dim=self.hidden_dim,
            sigma_data=self.sigma_data,
        )

    def _inputs(self, x: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"x must have shape [..., {self.in_dim}], got {tuple(x.shape)}")
        sigma = (
            torch.as_tensor(sigma, dtype=x.dtype, device=x.device).broadcast_to(x.shape[:-1]).unsqueeze(-1)
        )
        c_in = (self.sigma_data**2 + sigma**2).rsqrt()
        u = torch.cat([x * c_in, sigma.log() / 4, torch.ones_like(sigma)], dim=-1)
        return u, sigma, c_in

    def logp(self, x: torch.Tensor, sigma=0) -> torch.Tensor:
        """Unnormalised log-density at ``x`` [..., 2] and noise level ``sigma`` (scalar or [...])."""
        u, sigma, c_in = self._inputs(x, sigma)
        y = self.layers(u)
        return (y**2).mean(-1) * self.gain / sigma.squeeze(-1) - 0.5 * ((x * c_in) ** 2).sum(-1)

    def score(self, x: torch.Tensor, sigma=0, create_graph: bool | None = None) -> torch.Tensor:
        """``grad_x logp(x; sigma)`` [..., 2] by autograd. ``create_graph`` (default: the module's
        training mode) keeps the graph so that a loss on the score can be back-propagated."""
        if create_graph is None:
            create_graph = self.training
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            logp = self.logp(x, sigma)
            (score,) = torch.autograd.grad(logp.sum(), x, create_graph=create_graph)
        return score

    def forward(self, x: torch.Tensor, sigma, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Denoiser ``x + sigma^2 * score`` (EDM convention). The toy models are trained per class,
        so ``labels`` must be None."""
        if labels is not None:
            raise ValueError("labels must be None: a ToyModel is trained on one set of classes")
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).broadcast_to(x.shape[:-1]).unsqueeze(-1)
        return x + s**2 * self.score(x, sigma)
