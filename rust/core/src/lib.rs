//! Pure-Rust core of autoguide_fast (no Python types here).
//!
//! - [`schedule`]: the EDM sigma schedule and the per-step plan the samplers follow.
//! - [`phema`]: power-function EMA math (EDM2, Karras et al. 2024, Eqs. 123-127).
//! - [`posthoc`]: post-hoc EMA coefficients and streaming reconstruction over snapshots.
//! - [`mixture`]: exact log-density and score of 2D Gaussian mixtures under heat diffusion
//!   (the ground truth of the autoguidance toy experiment).
//! - [`store`]: memory-mapped, validated safetensors snapshots and atomic writes.
//! - [`idle`]: a pool of lowest-priority threads that prepares data in the foreground's gaps.
//! - [`toy_mlp`]: the score of the toy experiment's MLP in float32 (AVX-512).

pub mod error;
pub mod idle;
pub mod mixture;
pub mod phema;
pub mod posthoc;
pub mod schedule;
mod simd;
pub mod store;
pub mod toy_mlp;

pub use error::{Error, Result};
