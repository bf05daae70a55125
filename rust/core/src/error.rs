//! Typed errors of the core crate. The PyO3 layer maps each variant to one Python exception.

use thiserror::Error;

/// Everything the core can refuse.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum Error {
    /// A caller-supplied value is outside its domain (maps to `ValueError`).
    #[error("{name} must be {requirement}, got {value}")]
    InvalidParameter {
        name: &'static str,
        value: String,
        requirement: &'static str,
    },
    /// Two inputs disagree in length or shape (maps to `ValueError`).
    #[error("{what}: expected {expected}, got {got}")]
    ShapeMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// An iterative solver failed to converge (maps to the library's error class).
    #[error("{what} did not converge for {value}")]
    NoConvergence { what: &'static str, value: String },
    /// A file that should exist does not (maps to `FileNotFoundError`).
    #[error("{path}: no such file")]
    NotFound { path: String },
    /// Reading or writing a file failed (maps to `OSError`).
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    /// Files that must agree (e.g. snapshots of one network) do not (maps to the library's
    /// error class).
    #[error("{path}: does not match the other snapshots: {reason}")]
    Inconsistent { path: String, reason: String },
    /// A long operation was stopped by its progress callback.
    #[error("cancelled")]
    Cancelled,
    /// A file is not a valid snapshot: damaged, truncated or of another format (maps to the
    /// library's error class). Nothing of it is used.
    #[error("{path}: not a valid safetensors file: {reason}")]
    Format { path: String, reason: String },
    /// A computed output tensor holds NaN or infinity (maps to the library's error class).
    /// Nothing of the output is kept.
    #[error("{path}: tensor {tensor} would hold NaN or infinity ({cause}); nothing was written")]
    NonFinite {
        path: String,
        tensor: String,
        cause: String,
    },
    /// A job of the idle pool (`idle::spawn`) panicked (maps to the library's error class).
    #[error("a background job failed: {0}")]
    Background(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// An I/O error on `path`, `NotFound` when the file is missing.
pub(crate) fn io_error(path: &std::path::Path, err: std::io::Error) -> Error {
    let path = path.display().to_string();
    if err.kind() == std::io::ErrorKind::NotFound {
        Error::NotFound { path }
    } else {
        Error::Io {
            path,
            message: err.to_string(),
        }
    }
}

/// Shorthand for an `InvalidParameter` error.
pub(crate) fn invalid<T: std::fmt::Display>(
    name: &'static str,
    value: T,
    requirement: &'static str,
) -> Error {
    Error::InvalidParameter {
        name,
        value: value.to_string(),
        requirement,
    }
}

/// Checks that `values` holds two values for each of `n` points (`what` names them).
pub(crate) fn two_per_point<T>(what: &'static str, values: &[T], n: usize) -> Result<()> {
    if values.len() == 2 * n {
        return Ok(());
    }
    Err(Error::ShapeMismatch {
        what,
        expected: 2 * n,
        got: values.len(),
    })
}
