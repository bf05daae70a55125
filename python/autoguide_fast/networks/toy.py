"""The 2D toy denoiser of the autoguidance paper (Karras et al. 2024, Section 3).

An MLP outputs an unnormalised log-density ``log p(x; sigma)``; its score is the gradient in
``x`` and the denoiser is ``D(x, sigma) = x + sigma^2 * score`` (Tweedie).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence

import numpy as np
import torch

from .. import _core
from .compiling import warn_compile_failure
from .mp import _SILU_STD, MPConv, MPSiLU, normalize

__all__ = ["ToyModel", "ToyStack", "torch_single_threaded"]


@contextlib.contextmanager
def torch_single_threaded(active: bool = True):
    """Within: torch at one thread (where ``active``), while the Rust core's kernels, with a
    thread per core, do the heavy work and torch only small operations: torch's OpenMP workers
    otherwise spin against the core's at every hand-over (measured on 2 cores: the toy's
    sampling of one set 7.4 -> 4.9 s, its main models' training 5% faster)."""
    threads = torch.get_num_threads()
    if active:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if active:
            torch.set_num_threads(threads)


def _score_path() -> str:
    """``AUTOGUIDE_TOY``: ``core`` (default: the Rust core's float32 kernel where it runs) or
    ``torch`` (torch's operations everywhere, the reference the kernel is tested against)."""
    value = os.environ.get("AUTOGUIDE_TOY", "core")
    if value not in ("core", "torch"):
        raise ValueError(f"AUTOGUIDE_TOY must be 'core' or 'torch', got {value!r}")
    return value


def _core_accepts(sigma: torch.Tensor, *finite: torch.Tensor) -> bool:
    # Float32 CPU inputs the core's kernel accepts: the tensors `finite` finite, every noise level
    # positive (elsewhere torch computes the same formulas, NaN and all).
    return (
        all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (sigma, *finite))
        and all(bool(torch.isfinite(t).all()) for t in finite)
        and bool(((sigma > 0) & torch.isfinite(sigma)).all())
    )


def _raw(t: torch.Tensor) -> bytes:
    # A float32 tensor as the core's native-endian bytes.
    return t.detach().contiguous().numpy().tobytes()


def _from_raw(b: bytes, shape) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(b, dtype=np.float32).copy()).reshape(shape)


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
        if not create_graph:
            return self._score_explicit(x, sigma)
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            logp = self.logp(x, sigma)
            (score,) = torch.autograd.grad(logp.sum(), x, create_graph=create_graph)
        return score

    @torch.no_grad()
    def _score_explicit(self, x: torch.Tensor, sigma) -> torch.Tensor:
        # The score without autograd's graph (sampling: 2x faster): the forward pass h_l, then
        # the backward pass d_l = d logp / d h_l, as in ToyStack._block (its notation). Float32
        # on a CPU with AVX-512 takes the Rust core's kernel (2-3x faster again).
        V = [m.effective_weight(x.dtype) for m in self.layers[::2]]
        V = [V[0]] + [v / _SILU_STD for v in V[1:]]
        if self.uses_core and x.shape[-1:] == (2,):
            s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).broadcast_to(x.shape[:-1])
            if _core_accepts(s, x):
                return self._score_core(x, s, V)
        return self._score_torch(x, sigma, V)

    @property
    def uses_core(self) -> bool:
        """Whether the score of float32 CPU points without a graph (sampling) comes from the Rust
        core's kernel (``AUTOGUIDE_TOY`` = ``core``, 2-D points, 16, 32 or 64 features, AVX-512)."""
        return _score_path() == "core" and self.in_dim == 2 and _core.toy_mlp_available(self.hidden_dim)

    def _score_core(self, x: torch.Tensor, sigma: torch.Tensor, V: list[torch.Tensor]) -> torch.Tensor:
        score = _core.toy_mlp_score(
            _raw(x.reshape(-1, 2)),
            _raw(sigma.reshape(-1)),
            _raw(V[0]),
            [_raw(v) for v in V[1:]],
            float(self.gain),
            self.sigma_data,
        )
        return _from_raw(score, x.shape)

    def _score_torch(self, x, sigma, V) -> torch.Tensor:
        u, sigma, c_in = self._inputs(x, sigma)
        h, d1 = u @ V[0].mT, []
        for v in V[1:]:
            sig = torch.sigmoid(h)
            a = h * sig
            d1.append((h - a).add_(1).mul_(sig))
            h = a @ v.mT
        d = h.mul_((2 / self.hidden_dim) * self.gain / sigma)
        for v, s1 in zip(reversed(V[1:]), reversed(d1)):
            d = (d @ v).mul_(s1)
        return c_in * (d @ V[0][:, : self.in_dim]) - x * c_in**2

    def forward(self, x: torch.Tensor, sigma, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Denoiser ``x + sigma^2 * score`` (EDM convention). The toy models are trained per class,
        so ``labels`` must be None."""
        if labels is not None:
            raise ValueError("labels must be None: a ToyModel is trained on one set of classes")
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).broadcast_to(x.shape[:-1]).unsqueeze(-1)
        return x + s**2 * self.score(x, sigma)


# silu'(h) = sig (1 + h - silu(h)) and silu''(h) = 2 t + (silu'(h) - sig) (1 - 2 sig) with
# t = sig (1 - sig), from sig = sigmoid(h) and a = silu(h) = h sig (one transcendental per layer).
def silu_derivatives(h: torch.Tensor, sig: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, ...]:
    d1 = (h - a).add_(1).mul_(sig)
    t = sig - sig * sig
    d2 = (d1 - sig).mul_(torch.rsub(sig, 1, alpha=2)).add_(t, alpha=2)
    return d1, d2


# Gradient of a loss through W_eff = w / (||w_row|| + sqrt(fan_in) eps), the weight an MPConv
# applies in training mode (normalize(w) / sqrt(fan_in)), given grad_eff = dLoss / dW_eff.
def mp_weight_grad(w: torch.Tensor, grad_eff: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    r = torch.linalg.vector_norm(w, dim=-1, keepdim=True)
    q = r + math.sqrt(w.shape[-1]) * eps
    return (grad_eff - w * ((grad_eff * w).sum(-1, keepdim=True) / (r * q))) / q


class ToyStack(torch.nn.Module):
    """``S`` :class:`ToyModel` s of one shape with their parameters stacked (``weights[l]``
    [S, out, in], ``gain`` [S]), trained as one batched computation by :meth:`loss_backward`:
    the exact-score-matching loss and its parameter gradients by explicit formulas (the
    model's score is itself a gradient, so autograd would build a double-backward graph).
    """

    def __init__(self, models: Sequence[ToyModel]):
        super().__init__()
        if not models or len({(m.in_dim, m.num_layers, m.hidden_dim, m.sigma_data) for m in models}) != 1:
            raise ValueError("models must be a non-empty list of ToyModels of one configuration")
        self.config = models[0].config
        self.sigma_data = models[0].sigma_data
        layers = [[p.detach() for p in m.layers.parameters()] for m in models]
        self.weights = torch.nn.ParameterList(torch.nn.Parameter(torch.stack(ws)) for ws in zip(*layers))
        self.gain = torch.nn.Parameter(torch.stack([m.gain.detach() for m in models]))
        self._compiled = None

    def __len__(self) -> int:
        return len(self.gain)

    def models(self) -> list[ToyModel]:
        """The stacked models as separate :class:`ToyModel` s (eval mode, no gradients)."""
        out = []
        for i in range(len(self)):
            with torch.random.fork_rng(devices=[]):  # the initial weights are overwritten
                net = ToyModel(**self.config)
            state = {f"layers.{2 * l}.weight": w[i] for l, w in enumerate(self.weights)}
            net.load_state_dict(dict(state, gain=self.gain[i]))
            out.append(net.eval().requires_grad_(False))
        return out

    @torch.no_grad()
    def normalize_(self) -> None:
        """Forced weight normalisation (Eq. 66 of EDM2), as MPConv does in training mode before
        every forward pass with a changed weight."""
        for w in self.weights:
            w.copy_(normalize(w, dim=-1))

    # Points per block of :meth:`loss_backward`: the ~24 activations of a block of S = 3 models
    # stay in the caches (measured on 2 cores, 3 models of 64 features, freed memory reused: 35 ms
    # per step of 4,096 points in blocks of 1,024 against 45 ms in one block; 256 is slower again).
    BLOCK = 1024

    def compile_(self) -> ToyStack:
        """:meth:`loss_backward` runs its blocks through ``torch.compile`` from now on (inductor
        fuses the ~60 elementwise passes of a block: 45 -> 30 ms per step of three 4x64 models on
        2 cores, ~25 s to compile each block shape with a cold inductor cache, ~4 s warm,
        measured). A compiler failure (no C++
        compiler, say) warns once and the eager blocks serve; the two agree to float32 rounding."""
        if self._compiled is None:
            self._compiled = torch.compile(self._block, dynamic=False, fullgraph=True)
        return self

    @property
    def compiled(self) -> bool:
        """Whether the blocks run compiled (False after a compiler failure)."""
        return self._compiled is not None

    def _run_block(self, *args) -> tuple[torch.Tensor, torch.Tensor]:
        if self._compiled is not None:
            try:
                return self._compiled(*args)
            except Exception as e:  # no C++ compiler, or a compiler bug: the eager block is exact too
                warn_compile_failure("the toy training step", e, stacklevel=3)
                self._compiled = None
        return self._block(*args)

    @torch.no_grad()
    def loss_backward(self, x: torch.Tensor, sigma: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-model loss ``mean_n sigma^2 mean_d (target - score)^2`` [S] of points ``x``
        [S, N, 2] at noise levels ``sigma`` [S, N] against ``target`` scores [S, N, 2], the same
        as ``ToyModel.score`` in training mode with autograd; the loss's gradient is stored in
        every parameter's ``.grad``. Float32 CPU batches take the Rust core's kernel where it runs
        (:attr:`uses_core`); torch's operations take the points ``BLOCK`` at a time (the sums
        over points, and so the float32 rounding, are grouped by block)."""
        W = [normalize(w, dim=-1) / math.sqrt(w.shape[-1]) for w in self.weights]
        V = [W[0]] + [w / _SILU_STD for w in W[1:]]
        if self.uses_core and _core_accepts(sigma, x, target):
            loss, gain_grad, G = self._core_gradients(x, sigma, target, V)
        else:
            loss, gain_grad, G = self._torch_gradients(x, sigma, target, V)
        for l, (w, g) in enumerate(zip(self.weights, G)):
            w.grad = mp_weight_grad(w, g if l == 0 else g / _SILU_STD)
        self.gain.grad = gain_grad
        return loss

    @property
    def uses_core(self) -> bool:
        """Whether :meth:`loss_backward` takes the Rust core's kernel for float32 CPU batches
        (``AUTOGUIDE_TOY`` = ``core``, 2-D points, 16, 32 or 64 features, AVX-512): the whole
        stack's loss and gradients in one call, in blocks of points, 1.4x torch's compiled step
        and 1.8x its eager one (measured)."""
        return (
            _score_path() == "core"
            and self.gain.dtype == torch.float32
            and self.gain.device.type == "cpu"
            and self.config["in_dim"] == 2
            and _core.toy_mlp_available(self.config["hidden_dim"])
        )

    def _core_gradients(self, x, sigma, target, V):
        # One call for the whole stack: the blocks of all models share the core's threads.
        losses, gains, g0, gs = _core.toy_mlp_train_stack(
            _raw(x),
            _raw(sigma),
            _raw(target),
            _raw(V[0]),
            [_raw(v) for v in V[1:]],
            self.gain.detach().tolist(),
            self.sigma_data,
        )
        dtype = self.gain.dtype
        G = [_from_raw(g, v.shape) for g, v in zip([g0, *gs], V)]
        return torch.tensor(losses, dtype=dtype), torch.tensor(gains, dtype=dtype), G

    def _torch_gradients(self, x, sigma, target, V):
        N = sigma.shape[1]
        G = [torch.zeros_like(v) for v in V]
        loss = torch.zeros_like(self.gain)
        gain_grad = torch.zeros_like(self.gain)
        for i in range(0, N, self.BLOCK):
            j = min(i + self.BLOCK, N)
            block_loss, block_gain = self._run_block(x[:, i:j], sigma[:, i:j], target[:, i:j], V, G, N)
            loss += block_loss
            gain_grad += block_gain
        return loss, gain_grad, G

    def _block(self, x, sigma, target, V, G, N: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One block of :meth:`loss_backward`: adds the block's gradients in the applied weights
        ``V`` to ``G`` and returns its share of the loss and of the gain's gradient (``N``: the
        points of the whole batch).

        Notation (per model): u = (x c_in, log(sigma) / 4, 1), h_0 = W_0 u, h_l = V_l silu(h_{l-1})
        with V_l = W_l / 0.596, logp = gain / sigma * mean(h_L^2) - |x c_in|^2 / 2. The score is the
        backward pass d_L = k h_L (k = 2 gain / (sigma H)), b_l = V_l^T d_l, d_{l-1} = b_l silu'(h_{l-1}),
        score = c_in (W_0^T d_0)[:2] - x c_in^2; its adjoint runs forwards, then the forward
        pass's adjoint backwards.
        """
        H = V[0].shape[1]
        sigma = sigma.unsqueeze(-1)
        c_in = (self.sigma_data**2 + sigma**2).rsqrt()
        xc = x * c_in
        u = torch.cat([xc, sigma.log() / 4, torch.ones_like(sigma)], dim=-1)
        L = len(V) - 1
        # Forward: h_l, a_l = silu(h_{l-1}) (a_0 = u), and silu', silu'' at h_{l-1}.
        h, a, d1, d2 = [torch.bmm(u, V[0].mT)], [u], [], []
        for l in range(1, L + 1):
            sig = torch.sigmoid(h[-1])
            a.append(h[-1] * sig)
            for out, v in zip((d1, d2), silu_derivatives(h[-1], sig, a[-1])):
                out.append(v)
            h.append(torch.bmm(a[-1], V[l].mT))
        k = (2 / H) * self.gain[:, None, None] / sigma
        # Score: backward pass d_l (d logp / d h_l), b_l (d logp / d a_l).
        d, b = [None] * (L + 1), [None] * (L + 1)
        d[L] = k * h[L]
        for l in range(L, 0, -1):
            b[l] = torch.bmm(d[l], V[l])
            d[l - 1] = b[l] * d1[l - 1]
        score = c_in * torch.bmm(d[0], V[0][..., :2]) - xc * c_in
        diff = score - target
        loss = (sigma.squeeze(-1) ** 2 * diff.square().mean(-1)).sum(-1) / N
        # Adjoint of the score pass, l = 0 .. L: bars, and the weight gradients G_l.
        s_bar = c_in * sigma**2 * diff / N
        G[0][..., :2].baddbmm_(d[0].mT, s_bar)
        d_bar = torch.bmm(s_bar, V[0][..., :2].mT)
        h_bar = [None] * (L + 1)
        for l in range(1, L + 1):
            b_bar = d_bar * d1[l - 1]
            h_bar[l - 1] = (d_bar * b[l]).mul_(d2[l - 1])
            d_bar = torch.bmm(b_bar, V[l].mT)
            G[l].baddbmm_(d[l].mT, b_bar)
        gain_grad = ((2 / H) / sigma * (h[L] * d_bar).sum(-1, keepdim=True)).sum((1, 2))
        # Adjoint of the forward pass, l = L .. 0.
        h_bar[L] = k * d_bar
        for l in range(L, 0, -1):
            G[l].baddbmm_(h_bar[l].mT, a[l])
            h_bar[l - 1].addcmul_(torch.bmm(h_bar[l], V[l]), d1[l - 1])
        G[0].baddbmm_(h_bar[0].mT, u)
        return loss, gain_grad
