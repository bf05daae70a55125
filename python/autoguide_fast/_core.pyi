"""Stubs of the Rust extension module (rust/py/src/lib.rs). Keep in step with the Rust signatures."""

import os
from collections.abc import Callable
from typing import final

STD_MAX: float
"""Largest relative std of a power-function EMA profile (about 0.3003)."""

class AutoguideError(Exception):
    """Base class of autoguide_fast errors that are not plain ValueErrors."""

@final
class Step:
    """One step of the sampler plan."""

    @property
    def index(self) -> int: ...
    @property
    def t_cur(self) -> float: ...
    @property
    def t_hat(self) -> float: ...
    @property
    def t_next(self) -> float: ...
    @property
    def gamma(self) -> float: ...
    @property
    def second_order(self) -> bool: ...
    @property
    def guided(self) -> bool: ...
    @property
    def guided_next(self) -> bool: ...

@final
class Mixture2D:
    """2D Gaussian mixture with exact log-density and score under heat diffusion."""

    def __init__(self, phi: list[float], mu: list[float], cov: list[float]) -> None: ...
    def __len__(self) -> int: ...
    def eval(self, x: bytes, sigma: bytes) -> tuple[bytes, bytes, bytes]: ...
    def score_f32(self, x: bytes, sigma: bytes) -> bytes: ...
    def score_f32_start(self, x: bytes, sigma: bytes) -> PendingScore: ...

class PendingScore:
    """A float32 score computing on the core's idle threads."""

    def result(self) -> bytes: ...

def toy_mlp_available(hidden: int) -> bool: ...
def toy_mlp_score(
    x: bytes, sigma: bytes, v0: bytes, layers: list[bytes], gain: float, sigma_data: float
) -> bytes: ...
def toy_mlp_train_stack(
    x: bytes,
    sigma: bytes,
    target: bytes,
    v0: bytes,
    layers: list[bytes],
    gains: list[float],
    sigma_data: float,
) -> tuple[list[float], list[float], bytes, list[bytes]]: ...
def edm_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float) -> list[float]: ...
def step_plan(
    steps: int,
    sigma_min: float,
    sigma_max: float,
    rho: float,
    churn: float = 0.0,
    churn_min: float = 0.0,
    churn_max: float = ...,
    interval_lo: float = 0.0,
    interval_hi: float = ...,
) -> list[Step]: ...
def read_header(
    path: str | os.PathLike[str],
) -> tuple[dict[str, str], list[tuple[str, str, list[int], int, int]]]: ...
def write_snapshot(
    path: str | os.PathLike[str],
    tensors: list[tuple[str, str, list[int], int, int]],
    metadata: dict[str, str],
) -> None: ...
def solve_coefficients(
    in_nimg: list[float], in_std: list[float], out_nimg: list[float], out_std: list[float]
) -> list[list[float]]: ...
def reconstruct(
    inputs: list[str | os.PathLike[str]],
    coefs: list[list[float]],
    outputs: list[tuple[str | os.PathLike[str], dict[str, str]]],
    copy: list[str],
    progress: Callable[[int, int], object] | None = None,
    dtype: str | None = None,
) -> None: ...
def std_to_exp(std: float) -> float: ...
def exp_to_std(exp: float) -> float: ...
def power_function_beta(std: float, t_next: float, t_delta: float) -> float: ...
