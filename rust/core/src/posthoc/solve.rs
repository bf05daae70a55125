//! The least-squares coefficients of post-hoc EMA: which combination of the saved snapshots'
//! profiles best matches each requested profile (Karras et al. 2024, Algorithm 3).

use std::collections::BTreeSet;

use crate::error::{invalid, Error, Result};
use crate::phema::std_to_exp;

/// Most input snapshots [`solve_coefficients`] and [`reconstruct`](fn@super::reconstruct)
/// combine. The linear system is `n x n` (128 MiB and ~5e10 operations at this size); an EDM2
/// run saves a few hundred.
pub const MAX_SNAPSHOTS: usize = 4096;

/// Most profiles [`solve_coefficients`] solves for at once.
pub const MAX_PROFILES: usize = 4096;

/// Inner product of two power-function EMA profiles (Eq. 151): profile `a` ends at time
/// `a_t` with exponent `a_e`, profile `b` likewise.
fn correlation(a_t: f64, a_e: f64, b_t: f64, b_e: f64) -> f64 {
    let (ratio, exp) = if a_t < b_t {
        (a_t / b_t, b_e)
    } else {
        (a_t / b_t, -a_e)
    };
    (a_e + 1.0) * (b_e + 1.0) * ratio.powf(exp) / ((a_e + b_e + 1.0) * a_t.max(b_t))
}

/// LU factorisation with partial pivoting, solving `a x = b` for every column of `b`
/// (`a` is n x n, `b` n x m, both row-major). Returns None when a pivot vanishes relative to
/// the largest one (numerically singular).
fn lu_solve(mut a: Vec<f64>, mut b: Vec<f64>, n: usize, m: usize) -> Option<Vec<f64>> {
    let scale = a.iter().fold(0.0f64, |s, v| s.max(v.abs()));
    for k in 0..n {
        let p = (k..n).max_by(|&i, &j| a[i * n + k].abs().total_cmp(&a[j * n + k].abs()))?;
        let pivot = a[p * n + k].abs();
        if pivot.is_nan() || pivot <= 1e-14 * scale {
            return None;
        }
        if p != k {
            for c in 0..n {
                a.swap(k * n + c, p * n + c);
            }
            for c in 0..m {
                b.swap(k * m + c, p * m + c);
            }
        }
        for i in k + 1..n {
            let f = a[i * n + k] / a[k * n + k];
            a[i * n + k] = f;
            for c in k + 1..n {
                a[i * n + c] -= f * a[k * n + c];
            }
            for c in 0..m {
                b[i * m + c] -= f * b[k * m + c];
            }
        }
    }
    for c in 0..m {
        for i in (0..n).rev() {
            let mut s = b[i * m + c];
            for j in i + 1..n {
                s -= a[i * n + j] * b[j * m + c];
            }
            b[i * m + c] = s / a[i * n + i];
        }
    }
    Some(b)
}

/// The counts and lengths of [`solve_coefficients`]'s arguments, checked before anything is
/// allocated.
fn check_counts(in_nimg: &[f64], in_std: &[f64], out_nimg: &[f64], out_std: &[f64]) -> Result<()> {
    let (n, m) = (in_nimg.len(), out_nimg.len());
    if n == 0 {
        return Err(invalid("in_nimg", "[]", "at least one input snapshot"));
    }
    if n > MAX_SNAPSHOTS {
        return Err(invalid(
            "in_nimg",
            format!("{n} snapshots"),
            "at most 4096 snapshots",
        ));
    }
    if m > MAX_PROFILES {
        return Err(invalid(
            "out_nimg",
            format!("{m} profiles"),
            "at most 4096 profiles",
        ));
    }
    if in_std.len() != n {
        return Err(Error::ShapeMismatch {
            what: "in_std (one per input snapshot)",
            expected: n,
            got: in_std.len(),
        });
    }
    if out_std.len() != m {
        return Err(Error::ShapeMismatch {
            what: "out_std (one per output)",
            expected: m,
            got: out_std.len(),
        });
    }
    Ok(())
}

/// The profiles' times: finite and positive, outputs no later than the last snapshot, and no
/// snapshot (time and std) given twice.
fn check_times(in_nimg: &[f64], in_std: &[f64], out_nimg: &[f64]) -> Result<()> {
    for &t in in_nimg.iter().chain(out_nimg) {
        if !(t.is_finite() && t > 0.0) {
            return Err(invalid("nimg", t, "finite and > 0"));
        }
    }
    let last = in_nimg.iter().fold(0.0f64, |a, &b| a.max(b));
    if let Some(&t) = out_nimg.iter().find(|&&t| t > last) {
        return Err(invalid(
            "out_nimg",
            t,
            "at most the time of the last snapshot (no extrapolation)",
        ));
    }
    let mut seen = BTreeSet::new();
    for (&t, &s) in in_nimg.iter().zip(in_std) {
        if !seen.insert((t.to_bits(), s.to_bits())) {
            return Err(Error::InvalidParameter {
                name: "snapshots",
                value: format!("nimg={t}, std={s}"),
                requirement: "distinct (the same snapshot was given twice)",
            });
        }
    }
    Ok(())
}

/// The normal equations `a x = b` of the fit: `a` (n x n) the inner products of the input
/// profiles, `b` (n x m) those of the inputs with the outputs, both row-major.
fn normal_equations(
    in_nimg: &[f64],
    in_exp: &[f64],
    out_nimg: &[f64],
    out_exp: &[f64],
) -> (Vec<f64>, Vec<f64>) {
    let (n, m) = (in_nimg.len(), out_nimg.len());
    let mut a = vec![0.0; n * n];
    let mut b = vec![0.0; n * m];
    for i in 0..n {
        for j in 0..n {
            a[i * n + j] = correlation(in_nimg[i], in_exp[i], in_nimg[j], in_exp[j]);
        }
        for j in 0..m {
            b[i * m + j] = correlation(in_nimg[i], in_exp[i], out_nimg[j], out_exp[j]);
        }
    }
    (a, b)
}

/// Scales every column of `x` (n x `out_std.len()`, row-major) to sum 1, refusing a column
/// whose sum vanishes (a profile the snapshots cannot represent).
fn normalise_columns(mut x: Vec<f64>, n: usize, out_std: &[f64]) -> Result<Vec<f64>> {
    let m = out_std.len();
    for j in 0..m {
        let sum: f64 = (0..n).map(|i| x[i * m + j]).sum();
        if !(sum.is_finite() && sum.abs() > 1e-12) {
            return Err(invalid(
                "out_std",
                out_std[j],
                "a profile the snapshots can represent",
            ));
        }
        for i in 0..n {
            x[i * m + j] /= sum;
        }
    }
    Ok(x)
}

/// Coefficients `X[i][j]` such that output profile `j` (ending at `out_nimg[j]` with relative
/// std `out_std[j]`) is best approximated by `sum_i X[i][j] * snapshot_i`. Returned row-major,
/// `in x out`; every column sums to 1. At most [`MAX_SNAPSHOTS`] inputs and [`MAX_PROFILES`]
/// outputs (checked before anything is allocated).
pub fn solve_coefficients(
    in_nimg: &[f64],
    in_std: &[f64],
    out_nimg: &[f64],
    out_std: &[f64],
) -> Result<Vec<f64>> {
    check_counts(in_nimg, in_std, out_nimg, out_std)?;
    check_times(in_nimg, in_std, out_nimg)?;
    let (n, m) = (in_nimg.len(), out_nimg.len());
    let in_exp = in_std
        .iter()
        .map(|&s| std_to_exp(s))
        .collect::<Result<Vec<_>>>()?;
    let out_exp = out_std
        .iter()
        .map(|&s| std_to_exp(s))
        .collect::<Result<Vec<_>>>()?;
    let (a, b) = normal_equations(in_nimg, &in_exp, out_nimg, &out_exp);
    let x = lu_solve(a, b, n, m).ok_or_else(|| Error::InvalidParameter {
        name: "snapshots",
        value: format!("{n} snapshots"),
        requirement: "linearly independent profiles (the system is numerically singular)",
    })?;
    normalise_columns(x, n, out_std)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_equal_to_an_input_selects_it() {
        let nimg = [1e6, 1e6, 2e6, 2e6, 3e6, 3e6];
        let std = [0.05, 0.1, 0.05, 0.1, 0.05, 0.1];
        let x = solve_coefficients(&nimg, &std, &[2e6, 3e6], &[0.1, 0.05]).unwrap();
        for i in 0..6 {
            let want = [(i == 3) as u8 as f64, (i == 4) as u8 as f64];
            for j in 0..2 {
                assert!(
                    (x[i * 2 + j] - want[j]).abs() < 1e-9,
                    "{i} {j} {}",
                    x[i * 2 + j]
                );
            }
        }
    }

    #[test]
    fn columns_sum_to_one_and_errors_are_named() {
        let nimg = [1e6, 1e6, 2e6, 2e6];
        let std = [0.05, 0.1, 0.05, 0.1];
        let x = solve_coefficients(&nimg, &std, &[2e6, 1.5e6], &[0.07, 0.08]).unwrap();
        for j in 0..2 {
            assert!(((0..4).map(|i| x[i * 2 + j]).sum::<f64>() - 1.0).abs() < 1e-12);
        }
        let err = |r: Result<Vec<f64>>| r.unwrap_err().to_string();
        assert!(err(solve_coefficients(&nimg, &std, &[3e6], &[0.1])).starts_with("out_nimg"));
        assert!(
            err(solve_coefficients(&[1e6, 1e6], &[0.1, 0.1], &[1e6], &[0.1]))
                .contains("given twice")
        );
        assert!(err(solve_coefficients(&nimg, &std, &[2e6], &[0.4])).starts_with("std"));
    }
}
