//! Post-hoc EMA (Karras et al. 2024, Section 3.2 and Algorithm 3): any power-function EMA
//! profile is reconstructed as a linear combination of snapshots saved with other profiles.
//!
//! [`solve_coefficients`] finds the combination (closed-form inner products of profiles, a
//! linear solve, columns normalised to sum 1); [`reconstruct`] streams once over memory-mapped
//! snapshot files and accumulates every requested output at the same time.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use rayon::prelude::*;
use safetensors::tensor::Dtype;

use crate::error::{invalid, Error, Result};
use crate::phema::std_to_exp;
use crate::store::{MappedOutput, MappedSnapshot};

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

/// Coefficients `X[i][j]` such that output profile `j` (ending at `out_nimg[j]` with relative
/// std `out_std[j]`) is best approximated by `sum_i X[i][j] * snapshot_i`. Returned row-major,
/// `in x out`; every column sums to 1.
pub fn solve_coefficients(
    in_nimg: &[f64],
    in_std: &[f64],
    out_nimg: &[f64],
    out_std: &[f64],
) -> Result<Vec<f64>> {
    let (n, m) = (in_nimg.len(), out_nimg.len());
    if n == 0 {
        return Err(invalid("in_nimg", "[]", "at least one input snapshot"));
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
    let in_exp = in_std
        .iter()
        .map(|&s| std_to_exp(s))
        .collect::<Result<Vec<_>>>()?;
    let out_exp = out_std
        .iter()
        .map(|&s| std_to_exp(s))
        .collect::<Result<Vec<_>>>()?;
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
    let mut x = lu_solve(a, b, n, m).ok_or_else(|| Error::InvalidParameter {
        name: "snapshots",
        value: format!("{n} snapshots"),
        requirement: "linearly independent profiles (the system is numerically singular)",
    })?;
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

/// One requested output of [`reconstruct`].
#[derive(Debug, Clone)]
pub struct Output {
    pub path: PathBuf,
    pub metadata: BTreeMap<String, String>,
}

fn to_f32(dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        Dtype::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Dtype::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        Dtype::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        _ => unreachable!("checked before streaming"),
    }
}

/// IEEE half to single precision, subnormals included.
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: value = man * 2^-24.
            return f32::from_bits(sign)
                + if sign != 0 { -(man as f32) } else { man as f32 } * 2f32.powi(-24);
        }
        (0x1f, _) => sign | 0x7f80_0000 | (man << 13),
        _ => sign | ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// Inputs accumulated per pass over an output chunk: each pass reads and writes the output
/// chunk once for this many inputs.
const GROUP: usize = 4;

/// `y += sum_k w[k] * x[k]` over `N` inputs (same length as `y`).
#[inline(always)]
fn accumulate_n<const N: usize>(w: [f32; N], x: [&[f32]; N], y: &mut [f32]) {
    let len = y.len();
    let x: [&[f32]; N] = std::array::from_fn(|k| &x[k][..len]);
    for e in 0..len {
        let mut acc = y[e];
        for k in 0..N {
            acc += w[k] * x[k][e];
        }
        y[e] = acc;
    }
}

#[inline(always)]
fn accumulate_impl(w: &[f32], x: &[&[f32]], y: &mut [f32]) {
    match w.len() {
        1 => accumulate_n([w[0]], [x[0]], y),
        2 => accumulate_n([w[0], w[1]], [x[0], x[1]], y),
        3 => accumulate_n([w[0], w[1], w[2]], [x[0], x[1], x[2]], y),
        4 => accumulate_n([w[0], w[1], w[2], w[3]], [x[0], x[1], x[2], x[3]], y),
        k => unreachable!("groups hold 1 to {GROUP} inputs, got {k}"),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn accumulate_avx2(w: &[f32], x: &[&[f32]], y: &mut [f32]) {
    accumulate_impl(w, x, y)
}

/// `y += sum_k w[k] * x[k]` for up to [`GROUP`] inputs; 8-lane code on CPUs with AVX2 (the
/// same arithmetic, so the same results, as the baseline build).
fn accumulate(w: &[f32], x: &[&[f32]], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { accumulate_avx2(w, x, y) };
    }
    accumulate_impl(w, x, y)
}

const CHUNK: usize = 1 << 14; // elements per work item: m accumulators of it stay in cache

/// Streams once over `inputs` (all memory-mapped) and writes `outputs[j] = sum_i coefs[i][j] *
/// inputs[i]` for every floating-point tensor not listed in `copy`, accumulating in float32;
/// tensors in `copy` (and non-float tensors) are copied from the last input.
///
/// Work is split into chunks of elements; a chunk of every output is accumulated in cache
/// from the same chunk of every input and written once, so each input byte is read once and
/// each output byte written once. Input pages are released after each 1% of the work,
/// keeping resident memory to the outputs plus about 1% of the inputs. All inputs are
/// validated (same tensor names, shapes and kinds) before any data is read.
/// `progress(done, total)` reports work items done; an error from it stops the work.
pub fn reconstruct(
    inputs: &[PathBuf],
    coefs: &[f64],
    outputs: &[Output],
    copy: &BTreeSet<String>,
    mut progress: impl FnMut(usize, usize) -> Result<()>,
) -> Result<()> {
    let (n, m) = (inputs.len(), outputs.len());
    if coefs.len() != n * m {
        return Err(Error::ShapeMismatch {
            what: "coefs (inputs x outputs)",
            expected: n * m,
            got: coefs.len(),
        });
    }
    if n == 0 || m == 0 {
        return Err(invalid("inputs", n, "at least one input and one output"));
    }
    let is_float = |d: &str| matches!(d, "F32" | "F16" | "BF16");
    let snaps = inputs
        .iter()
        .map(MappedSnapshot::open)
        .collect::<Result<Vec<_>>>()?;
    let layout: Vec<(String, String, Vec<usize>)> = snaps[0]
        .header()
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.dtype.clone(), t.shape.clone()))
        .collect();
    // Per input, per layout tensor: (dtype, absolute byte offset).
    let mut where_: Vec<Vec<(Dtype, usize)>> = Vec::with_capacity(n);
    for (snap, path) in snaps.iter().zip(inputs) {
        let names: BTreeMap<&str, &crate::store::TensorEntry> = snap
            .header()
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect();
        let fail = |reason: String| Error::Inconsistent {
            path: path.display().to_string(),
            reason,
        };
        if names.len() != layout.len() {
            return Err(fail(format!(
                "has {} tensors, {} has {}",
                names.len(),
                inputs[0].display(),
                layout.len()
            )));
        }
        let mut row = Vec::with_capacity(layout.len());
        for (name, dtype, shape) in &layout {
            let t = names.get(name.as_str()).ok_or_else(|| {
                fail(format!(
                    "tensor {name} is missing (present in {})",
                    inputs[0].display()
                ))
            })?;
            if &t.shape != shape {
                return Err(fail(format!(
                    "tensor {name} has shape {:?}, but {shape:?} in {}",
                    t.shape,
                    inputs[0].display()
                )));
            }
            if is_float(&t.dtype) != is_float(dtype) {
                return Err(fail(format!(
                    "tensor {name} has dtype {}, but {dtype} in {}",
                    t.dtype,
                    inputs[0].display()
                )));
            }
            row.push((crate::store::parse_dtype(&t.dtype)?, t.begin));
        }
        where_.push(row);
    }
    let averaged: Vec<usize> = (0..layout.len())
        .filter(|&t| is_float(&layout[t].1) && !copy.contains(&layout[t].0))
        .collect();

    // Outputs are written in place through writable maps of their temporary files: averaged
    // tensors first (float32, so aligned), then the copied ones, which are filled right away.
    let last = &snaps[n - 1];
    let numel = |t: usize| layout[t].2.iter().product::<usize>();
    let copied: Vec<usize> = (0..layout.len())
        .filter(|t| !averaged.contains(t))
        .collect();
    let mut spec: Vec<(String, Dtype, Vec<usize>)> = averaged
        .iter()
        .map(|&t| (layout[t].0.clone(), Dtype::F32, layout[t].2.clone()))
        .collect();
    for &t in &copied {
        spec.push((layout[t].0.clone(), where_[n - 1][t].0, layout[t].2.clone()));
    }
    let mut files = outputs
        .iter()
        .map(|o| MappedOutput::create(&o.path, &spec, &o.metadata))
        .collect::<Result<Vec<_>>>()?;
    let region = match (files[0].entries().first(), averaged.len()) {
        (Some(first), a) if a > 0 => (first.1, files[0].entries()[a - 1].2),
        _ => (0, 0),
    };
    for file in files.iter_mut() {
        let entries = file.entries().to_vec();
        for (k, &t) in copied.iter().enumerate() {
            let (_, b, e) = &entries[averaged.len() + k];
            file.bytes_mut()[*b..*e].copy_from_slice(last.bytes(&layout[t].0)?);
        }
    }
    // Float32 views of every output's averaged tensors.
    let mut acc: Vec<Vec<&mut [f32]>> = Vec::with_capacity(m);
    for file in files.iter_mut() {
        let bytes = &mut file.bytes_mut()[region.0..region.1];
        // SAFETY: every bit pattern is a valid f32, and the region starts 8-byte aligned (the
        // map is page-aligned and the header is padded to a multiple of 8).
        let (head, floats, _) = unsafe { bytes.align_to_mut::<f32>() };
        assert!(
            head.is_empty(),
            "tensor data of a mapped output is 8-byte aligned"
        );
        let mut rest = floats;
        let mut views = Vec::with_capacity(averaged.len());
        for &t in &averaged {
            let (v, tail) = std::mem::take(&mut rest).split_at_mut(numel(t));
            views.push(v);
            rest = tail;
        }
        acc.push(views);
    }
    // Work items (tensor, element range), each owning disjoint slices of every output.
    let items: Vec<(usize, usize, usize)> = averaged
        .iter()
        .flat_map(|&t| {
            (0..numel(t))
                .step_by(CHUNK)
                .map(move |lo| (t, lo, (lo + CHUNK).min(numel(t))))
        })
        .collect();
    let mut slices: Vec<Vec<&mut [f32]>> = Vec::with_capacity(items.len());
    {
        let position: BTreeMap<usize, usize> =
            averaged.iter().enumerate().map(|(k, &t)| (t, k)).collect();
        for &(t, lo, hi) in &items {
            let k = position[&t];
            slices.push(
                acc.iter_mut()
                    .map(|o| {
                        let (head, tail) = std::mem::take(&mut o[k]).split_at_mut(hi - lo);
                        o[k] = tail;
                        head
                    })
                    .collect(),
            );
        }
    }
    let weights: Vec<f32> = coefs.iter().map(|&c| c as f32).collect(); // [in][out]
    let total = items.len();
    let per_batch = total.div_ceil(100).max(1);
    let mut done = 0;
    for (batch, outs) in items.chunks(per_batch).zip(slices.chunks_mut(per_batch)) {
        batch.par_iter().zip(outs.par_iter_mut()).for_each_init(
            || (vec![0.0f32; GROUP * CHUNK], vec![0.0f32; m * CHUNK]),
            |(scratch, local), (&(t, lo, hi), outs)| {
                let len = hi - lo;
                local[..m * len].fill(0.0);
                for start in (0..n).step_by(GROUP) {
                    let group = start..(start + GROUP).min(n);
                    let mut srcs: Vec<&[f32]> = Vec::with_capacity(GROUP);
                    let mut free = scratch.chunks_mut(CHUNK);
                    for i in group.clone() {
                        let (dtype, begin) = where_[i][t];
                        let size = dtype.bitsize() / 8;
                        let bytes = &snaps[i].bytes_all()[begin + lo * size..begin + hi * size];
                        // SAFETY: every bit pattern is a valid f32; align_to only yields the
                        // aligned middle part, used only when it covers the whole range.
                        let (head, direct, _) = unsafe { bytes.align_to::<f32>() };
                        if dtype == Dtype::F32 && head.is_empty() && direct.len() == len {
                            srcs.push(direct);
                        } else {
                            let buf = &mut free.next().expect("one scratch chunk per group member")
                                [..len];
                            to_f32(dtype, bytes, buf);
                            srcs.push(buf);
                        }
                    }
                    let mut w = [0.0f32; GROUP];
                    for j in 0..m {
                        for (slot, i) in w.iter_mut().zip(group.clone()) {
                            *slot = weights[i * m + j];
                        }
                        accumulate(&w[..group.len()], &srcs, &mut local[j * len..(j + 1) * len]);
                    }
                }
                for (j, out) in outs.iter_mut().enumerate() {
                    out.copy_from_slice(&local[j * len..(j + 1) * len]);
                }
            },
        );
        // Release the input pages this batch has read, in few large calls: each call costs a
        // TLB shootdown across threads, so per-chunk calls would dominate the run time.
        for (i, snap) in snaps.iter().enumerate() {
            let mut ranges: Vec<(usize, usize)> = batch
                .iter()
                .map(|&(t, lo, hi)| {
                    let (dtype, begin) = where_[i][t];
                    let size = dtype.bitsize() / 8;
                    (begin + lo * size, begin + hi * size)
                })
                .collect();
            ranges.sort_unstable();
            let mut merged: Vec<(usize, usize)> = Vec::new();
            for (a, b) in ranges {
                match merged.last_mut() {
                    Some(last) if last.1 == a => last.1 = b,
                    _ => merged.push((a, b)),
                }
            }
            for (a, b) in merged {
                snap.release(a, b);
            }
        }
        done += batch.len();
        progress(done, total)?;
    }

    drop(slices);
    drop(acc);
    for file in files {
        file.commit()?;
    }
    Ok(())
}

#[cfg(target_endian = "big")]
compile_error!("safetensors data is little-endian; this crate assumes a little-endian host");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_conversion() {
        for (h, want) in [
            (0x3c00u16, 1.0f32),
            (0xc000, -2.0),
            (0x0001, 5.960_464_5e-8),
            (0x7bff, 65504.0),
            (0x0000, 0.0),
        ] {
            assert_eq!(f16_to_f32(h), want, "{h:#x}");
        }
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(f16_to_f32(0xfc00), f32::NEG_INFINITY);
    }

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
