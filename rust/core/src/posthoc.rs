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
use crate::store::{MappedSnapshot, OutputFile};

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

/// Most input snapshots [`solve_coefficients`] and [`reconstruct`] combine. The linear system
/// is `n x n` (128 MiB and ~5e10 operations at this size); an EDM2 run saves a few hundred.
pub const MAX_SNAPSHOTS: usize = 4096;

/// Most profiles [`solve_coefficients`] solves for at once.
pub const MAX_PROFILES: usize = 4096;

/// Most outputs one [`reconstruct`] pass writes: each holds an open file and a float32
/// accumulator of 64 KiB per worker thread.
pub const MAX_OUTPUTS: usize = 256;

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

/// `fn $name(...) $body`, compiled twice from the same source: for x86 CPUs with the listed
/// features (8-lane loops), used where the CPU has them, and portably. Same source, same
/// arithmetic, so the same results.
macro_rules! multiversioned {
    ([$($feature:tt),+] $(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn portable($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            $(#[target_feature(enable = $feature)])+
            fn fast($($arg: $ty),*) {
                portable($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            if $(std::arch::is_x86_feature_detected!($feature))&&+ {
                // SAFETY: the CPU has every feature `fast` is compiled for, checked just above.
                return unsafe { fast($($arg),*) };
            }
            portable($($arg),*)
        }
    };
}

multiversioned! {["avx2"]
    /// bfloat16 bits to float32 (the upper half of the float's bits): a shift, which the
    /// compiler vectorises.
    fn bf16_to_f32(words: &[u16], out: &mut [f32]) {
        for (o, &w) in out.iter_mut().zip(words) {
            *o = f32::from_bits((w as u32) << 16);
        }
    }
}

/// float16 <-> float32 with F16C instructions, 8 lanes at a time, in loops the compiler can
/// unroll. The `half` crate's slice conversions issue the same instructions (so round the same
/// way) but make one call per 8 lanes, through a copy: a quarter of the CPU time of a float16
/// reconstruction went there. Tails go through `half`.
#[cfg(target_arch = "x86_64")]
mod f16c {
    use std::arch::x86_64::{
        _mm256_cvtph_ps, _mm256_cvtps_ph, _mm256_loadu_ps, _mm256_storeu_ps, _mm_loadu_si128,
        _mm_storeu_si128, _MM_FROUND_TO_NEAREST_INT,
    };

    /// float16 bits to float32 (exact).
    #[target_feature(enable = "avx,f16c")]
    pub fn widen(words: &[u16], out: &mut [f32]) {
        let n = words.len().min(out.len());
        let body = n / 8 * 8;
        for i in (0..body).step_by(8) {
            // SAFETY: i + 8 <= n, within both slices; the loads and stores are unaligned ones.
            unsafe {
                let h = _mm_loadu_si128(words.as_ptr().add(i).cast());
                _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
        }
        for (o, &w) in out[body..n].iter_mut().zip(&words[body..n]) {
            *o = half::f16::from_bits(w).to_f32();
        }
    }

    /// float32 to float16 bits, rounded to nearest-even (overflow to infinity, NaN stays NaN).
    #[target_feature(enable = "avx,f16c")]
    pub fn narrow(x: &[f32], out: &mut [u16]) {
        let n = x.len().min(out.len());
        let body = n / 8 * 8;
        for i in (0..body).step_by(8) {
            // SAFETY: i + 8 <= n, within both slices; the loads and stores are unaligned ones.
            unsafe {
                let v = _mm256_loadu_ps(x.as_ptr().add(i));
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                _mm_storeu_si128(out.as_mut_ptr().add(i).cast(), h);
            }
        }
        for (o, &v) in out[body..n].iter_mut().zip(&x[body..n]) {
            *o = half::f16::from_f32(v).to_bits();
        }
    }
}

/// float16 bits to float32: F16C where the CPU has it, else the `half` crate.
fn f16_to_f32(words: &[u16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") && std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: the CPU has AVX and F16C, checked just above.
        return unsafe { f16c::widen(words, out) };
    }
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
    words
        .reinterpret_cast::<half::f16>()
        .convert_to_f32_slice(out)
}

/// Little-endian tensor bytes of `dtype` (F32, F16 or BF16) to float32. Half-precision slices
/// convert with vectorised code (float16 through the `half` crate, F16C on x86 when present).
fn to_f32(dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
    // SAFETY: every bit pattern is a valid u16; only the aligned middle part is used, and only
    // when it covers the whole range.
    let (head, words, _) = unsafe { bytes.align_to::<u16>() };
    let aligned = head.is_empty() && words.len() == out.len();
    match dtype {
        Dtype::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Dtype::F16 if aligned => f16_to_f32(words, out),
        Dtype::BF16 if aligned => bf16_to_f32(words, out),
        Dtype::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        Dtype::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        _ => unreachable!("checked before streaming"),
    }
}

/// Inputs accumulated per pass over the accumulators.
const GROUP: usize = 8;

/// `y[j][e] += sum_k w[k][j] * x[k][e]` for `G` inputs and `B` outputs of the same length:
/// each input element is loaded once for all `B` outputs, whose partial sums stay in
/// registers. Sums run over the inputs in order, so the result does not depend on `G`, `B`
/// or the instruction set.
#[inline(always)]
fn accumulate_block<const G: usize, const B: usize>(
    w: &[[f32; B]; G],
    x: &[&[f32]],
    y: &mut [&mut [f32]],
) {
    let len = y[0].len();
    let x: [&[f32]; G] = std::array::from_fn(|k| &x[k][..len]);
    let mut rows = y.iter_mut();
    let y: [&mut [f32]; B] = std::array::from_fn(|_| &mut rows.next().expect("B outputs")[..len]);
    for e in 0..len {
        let mut acc: [f32; B] = std::array::from_fn(|j| y[j][e]);
        for k in 0..G {
            let v = x[k][e];
            for j in 0..B {
                acc[j] += w[k][j] * v;
            }
        }
        for j in 0..B {
            y[j][e] = acc[j];
        }
    }
}

/// Largest of 8, 4, 2, 1 that is at most `n` (n >= 1).
fn block_size(n: usize) -> usize {
    [8, 4, 2, 1].into_iter().find(|&b| b <= n).unwrap_or(1)
}

macro_rules! dispatch_block {
    ($g:expr, $b:expr, $w:expr, $x:expr, $y:expr; $(($G:literal, $B:literal)),*) => {
        match ($g, $b) {
            $(($G, $B) => {
                let w: [[f32; $B]; $G] = std::array::from_fn(|k| std::array::from_fn(|j| $w(k, j)));
                accumulate_block::<$G, $B>(&w, $x, $y)
            })*
            (g, b) => unreachable!("blocks of 1, 2, 4 or 8, got {g} x {b}"),
        }
    };
}

/// `y[j] += sum_k w[k * m + j] * x[k]` for every output `j < m = y.len()` and input
/// `k < x.len()` (at most [`GROUP`]), in blocks of up to 8 x 8.
#[inline(always)]
fn accumulate_impl(w: &[f32], x: &[&[f32]], y: &mut [&mut [f32]]) {
    let m = y.len();
    let mut j0 = 0;
    while j0 < m {
        let b = block_size(m - j0);
        let mut k0 = 0;
        while k0 < x.len() {
            let g = block_size(x.len() - k0);
            let wk = |k: usize, j: usize| w[(k0 + k) * m + j0 + j];
            dispatch_block!(g, b, wk, &x[k0..k0 + g], &mut y[j0..j0 + b];
                (8, 8), (8, 4), (8, 2), (8, 1), (4, 8), (4, 4), (4, 2), (4, 1),
                (2, 8), (2, 4), (2, 2), (2, 1), (1, 8), (1, 4), (1, 2), (1, 1));
            k0 += g;
        }
        j0 += b;
    }
}

multiversioned! {["avx2"]
    /// `y[j] += sum_k w[k * m + j] * x[k]` (see [`accumulate_impl`]).
    fn accumulate(w: &[f32], x: &[&[f32]], y: &mut [&mut [f32]]) {
        accumulate_impl(w, x, y)
    }
}

/// Element types without padding bytes.
trait Plain: Copy {}
impl Plain for f32 {}
impl Plain for u16 {}

/// The little-endian bytes of `x` (safetensors byte order; the crate requires a little-endian
/// host).
fn le_bytes<T: Plain>(x: &[T]) -> &[u8] {
    // SAFETY: `Plain` types have no padding and u8 has alignment 1; the length covers exactly
    // `x`.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}

/// float32 to float16 bits, rounded to nearest-even: F16C where the CPU has it, else the `half`
/// crate.
fn f32_to_f16(x: &[f32], out: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") && std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: the CPU has AVX and F16C, checked just above.
        return unsafe { f16c::narrow(x, out) };
    }
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
    out.reinterpret_cast_mut::<half::f16>()
        .convert_from_f32_slice(x)
}

multiversioned! {["avx2"]
    /// float32 to bfloat16 bits through the `half` crate, rounded to nearest-even.
    fn f32_to_bf16(x: &[f32], out: &mut [u16]) {
        use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
        out.reinterpret_cast_mut::<half::bf16>().convert_from_f32_slice(x)
    }
}

/// Whether every element of `bits` has an exponent field (`mask`) short of all ones, i.e. no
/// element is NaN or infinite. An OR over every element without an early exit, so that it
/// vectorises: a few percent of the pass that produced the values.
#[inline(always)]
fn exponents_finite(bits: impl Iterator<Item = u32>, mask: u32) -> bool {
    bits.fold(0u32, |any, b| any | u32::from(b & mask == mask)) == 0
}

/// The little-endian bytes of `x` rounded once to `dtype` (F32, F16 or BF16), to nearest-even as
/// `torch.Tensor.to(dtype)` rounds, and whether every value is finite in `dtype` (a float32
/// value beyond the range of float16 becomes infinite there); `words` (at least as long as `x`)
/// holds 16-bit results.
fn from_f32<'a>(dtype: Dtype, x: &'a [f32], words: &'a mut [u16]) -> (&'a [u8], bool) {
    let words = &mut words[..x.len()];
    let mask = match dtype {
        Dtype::F32 => {
            let finite = exponents_finite(x.iter().map(|v| v.to_bits()), 0x7f80_0000);
            return (le_bytes(x), finite);
        }
        Dtype::F16 => {
            f32_to_f16(x, words);
            0x7c00
        }
        Dtype::BF16 => {
            f32_to_bf16(x, words);
            0x7f80
        }
        _ => unreachable!("checked before streaming"),
    };
    let finite = exponents_finite(words.iter().map(|&w| u32::from(w)), mask);
    (le_bytes(words), finite)
}

/// Granularity of input page release.
const PAGE: usize = 4096;

/// Disjoint half-open byte ranges, merged as they are added.
#[derive(Default)]
struct Intervals(BTreeMap<usize, usize>);

impl Intervals {
    /// Adds `[a, b)` and returns the merged range that now contains it.
    fn insert(&mut self, mut a: usize, mut b: usize) -> (usize, usize) {
        if let Some((&s, &e)) = self.0.range(..=a).next_back() {
            if e >= a {
                self.0.remove(&s);
                a = s;
                b = b.max(e);
            }
        }
        while let Some((&s, &e)) = self.0.range(a..=b).next() {
            self.0.remove(&s);
            b = b.max(e);
        }
        self.0.insert(a, b);
        (a, b)
    }

    /// The range that contains `a` (which must have been inserted).
    fn containing(&self, a: usize) -> (usize, usize) {
        let (&s, &e) = self
            .0
            .range(..=a)
            .next_back()
            .expect("an inserted position");
        (s, e)
    }

    /// The parts of `[a, b)` not covered.
    fn gaps(&self, a: usize, b: usize) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        if a >= b {
            return out;
        }
        let mut at = a;
        let first = self.0.range(..=a).next_back().map(|(&s, &e)| (s, e));
        for (s, e) in first
            .into_iter()
            .chain(self.0.range(a + 1..b).map(|(&s, &e)| (s, e)))
        {
            if s > at {
                out.push((at, s.min(b)));
            }
            at = at.max(e);
            if at >= b {
                break;
            }
        }
        if at < b {
            out.push((at, b));
        }
        out
    }
}

const CHUNK: usize = 1 << 14; // elements per work item: each output's part is written at once

/// Elements per pass within a work item: the accumulators of this many elements of every output
/// and a group's converted inputs stay in the innermost caches.
const SUB: usize = 2048;

/// Padding (one cache line of f32) after each accumulator row and converted block. Without it
/// the rows (64 KiB apart) and blocks (8 KiB apart) all map to the same sets of the L1 cache and
/// evict one another: the accumulation ran ~20% slower.
const PAD: usize = 16;

/// One work item of [`reconstruct`]: elements `lo..hi` of layout tensor `tensor`, written as
/// `dtype` from byte `at` of tensor data on (the same in every output, whose headers may differ
/// in length).
#[derive(Debug, Clone, Copy)]
struct Item {
    tensor: usize,
    lo: usize,
    hi: usize,
    at: usize,
    dtype: Dtype,
}

impl Item {
    /// The end of the item's bytes, from the start of tensor data.
    fn end(&self) -> usize {
        self.at + (self.hi - self.lo) * (self.dtype.bitsize() / 8)
    }
}

/// Per-thread buffers of [`combine_item`], allocated once.
struct Buffers {
    /// [`GROUP`] inputs' blocks of [`SUB`] elements converted to float32, [`PAD`] apart.
    scratch: Vec<f32>,
    /// The float32 accumulators of every output, [`CHUNK`] elements each, [`PAD`] apart.
    local: Vec<f32>,
    /// One output's chunk rounded to a 16-bit dtype.
    words: Vec<u16>,
}

/// Combines `item` (of the tensor named `name`) from every input into every output and writes
/// it; fails with [`Error::NonFinite`] before writing a part that holds NaN or infinity.
fn combine_item(
    snaps: &[MappedSnapshot],
    where_: &[Vec<(Dtype, usize)>],
    weights: &[f32],
    item: Item,
    name: &str,
    buffers: &mut Buffers,
    files: &[OutputFile],
) -> Result<()> {
    let Item {
        tensor: t, lo, hi, ..
    } = item;
    let Buffers {
        scratch,
        local,
        words,
    } = buffers;
    let (n, m, len) = (snaps.len(), files.len(), hi - lo);
    for row in local.chunks_mut(CHUNK + PAD).take(m) {
        row[..len].fill(0.0);
    }
    for s0 in (0..len).step_by(SUB) {
        let s1 = (s0 + SUB).min(len);
        for start in (0..n).step_by(GROUP) {
            let group = start..(start + GROUP).min(n);
            let mut srcs: Vec<&[f32]> = Vec::with_capacity(GROUP);
            let mut free = scratch.chunks_mut(SUB + PAD);
            for i in group.clone() {
                let (dtype, begin) = where_[i][t];
                let size = dtype.bitsize() / 8;
                let bytes =
                    &snaps[i].bytes_all()[begin + (lo + s0) * size..begin + (lo + s1) * size];
                // SAFETY: every bit pattern is a valid f32; align_to only yields the aligned
                // middle part, used only when it covers the whole range.
                let (head, direct, _) = unsafe { bytes.align_to::<f32>() };
                if dtype == Dtype::F32 && head.is_empty() && direct.len() == s1 - s0 {
                    srcs.push(direct);
                } else {
                    let buf =
                        &mut free.next().expect("one scratch block per group member")[..s1 - s0];
                    to_f32(dtype, bytes, buf);
                    srcs.push(buf);
                }
            }
            let mut outs: Vec<&mut [f32]> = local
                .chunks_mut(CHUNK + PAD)
                .take(m)
                .map(|row| &mut row[s0..s1])
                .collect();
            accumulate(&weights[start * m..group.end * m], &srcs, &mut outs);
        }
    }
    for (file, row) in files.iter().zip(local.chunks(CHUNK + PAD)) {
        let (bytes, finite) = from_f32(item.dtype, &row[..len], words);
        if !finite {
            return Err(non_finite(snaps, where_, item, name, file));
        }
        file.write_at(file.data_start() + item.at, bytes)?;
    }
    Ok(())
}

/// The error for elements `item.lo..item.hi` of tensor `name` of output `file` holding NaN or
/// infinity, naming the first input that holds one there, or else the overflow. Only on the
/// failure path: reads the range of every input once more.
fn non_finite(
    snaps: &[MappedSnapshot],
    where_: &[Vec<(Dtype, usize)>],
    item: Item,
    name: &str,
    file: &OutputFile,
) -> Error {
    let mut values = vec![0.0f32; item.hi - item.lo];
    let culprit = snaps.iter().zip(where_).find(|(snap, row)| {
        let (dtype, begin) = row[item.tensor];
        let size = dtype.bitsize() / 8;
        let bytes = &snap.bytes_all()[begin + item.lo * size..begin + item.hi * size];
        to_f32(dtype, bytes, &mut values);
        values.iter().any(|v| !v.is_finite())
    });
    let cause = match culprit {
        Some((snap, _)) => format!(
            "input {} holds NaN or infinity in it",
            snap.path().display()
        ),
        None => format!(
            "every input is finite there: the weighted sum overflows {}",
            item.dtype
        ),
    };
    Error::NonFinite {
        path: file.path().display().to_string(),
        tensor: name.to_string(),
        cause,
    }
}

/// Streams once over `inputs` (all memory-mapped) and writes `outputs[j] = sum_i coefs[i][j] *
/// inputs[i]` for every floating-point tensor not listed in `copy`, accumulating in float32;
/// tensors in `copy` (and non-float tensors) are copied from the last input.
///
/// Each averaged tensor is written as `dtype` (F32, F16 or BF16), or with `None` in the dtype
/// its inputs share (float32 where they differ), rounded once from the float32 sum to
/// nearest-even, as `torch.Tensor.to` rounds.
///
/// Work is split into chunks of elements; a chunk of every output is accumulated in cache
/// from the same chunk of every input and written once (positional writes into the outputs'
/// temporary files), so each input byte is read once and each output byte written once.
/// Work runs in batches of 1%; while one batch is computed, the previous one's output ranges
/// start their writeback to disk and the input pages it read are released, so resident memory
/// stays near two batches of the inputs and the final fsync has little left to do. All inputs
/// are validated (same tensor names, shapes and kinds) before any data is read; outputs are
/// fsynced together, then renamed into place.
/// `progress(done, total)` reports work items done; an error from it stops the work.
///
/// An averaged tensor that would hold NaN or infinity (an input holds one, or the sum overflows
/// the output dtype) fails with [`Error::NonFinite`] naming it, and no output is written; the
/// check runs on each output part as it is produced. Tensors copied from the last input are
/// copied as they are. At most [`MAX_SNAPSHOTS`] inputs and [`MAX_OUTPUTS`] outputs (checked
/// before anything is opened or allocated).
pub fn reconstruct(
    inputs: &[PathBuf],
    coefs: &[f64],
    outputs: &[Output],
    copy: &BTreeSet<String>,
    dtype: Option<Dtype>,
    mut progress: impl FnMut(usize, usize) -> Result<()>,
) -> Result<()> {
    let (n, m) = (inputs.len(), outputs.len());
    if n == 0 || m == 0 {
        return Err(invalid("inputs", n, "at least one input and one output"));
    }
    if n > MAX_SNAPSHOTS {
        return Err(invalid("inputs", n, "at most 4096 snapshots"));
    }
    if m > MAX_OUTPUTS {
        return Err(invalid("outputs", m, "at most 256 files per pass"));
    }
    if coefs.len() != n * m {
        return Err(Error::ShapeMismatch {
            what: "coefs (inputs x outputs)",
            expected: n * m,
            got: coefs.len(),
        });
    }
    let is_float = |d: Dtype| matches!(d, Dtype::F32 | Dtype::F16 | Dtype::BF16);
    if let Some(d) = dtype.filter(|&d| !is_float(d)) {
        return Err(invalid("dtype", d, "F32, F16 or BF16"));
    }
    let snaps = inputs
        .iter()
        .map(|p| {
            let snap = MappedSnapshot::open(p)?;
            snap.prepare_streaming();
            Ok(snap)
        })
        .collect::<Result<Vec<_>>>()?;
    let layout: Vec<(String, Dtype, Vec<usize>)> = snaps[0]
        .header()
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
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
            if is_float(t.dtype) != is_float(*dtype) {
                return Err(fail(format!(
                    "tensor {name} has dtype {}, but {dtype} in {}",
                    t.dtype,
                    inputs[0].display()
                )));
            }
            row.push((t.dtype, t.begin));
        }
        where_.push(row);
    }
    let averaged: Vec<usize> = (0..layout.len())
        .filter(|&t| is_float(layout[t].1) && !copy.contains(&layout[t].0))
        .collect();

    // Outputs are written with positional writes into their temporary files: averaged
    // tensors first (in `averaged` order, so a run of work items is one contiguous byte range
    // of every output), then the copied ones, written right away.
    let last = &snaps[n - 1];
    let numel = |t: usize| layout[t].2.iter().product::<usize>();
    let out_dtype = |t: usize| {
        dtype.unwrap_or_else(|| {
            let first = where_[0][t].0;
            if where_.iter().all(|row| row[t].0 == first) {
                first
            } else {
                Dtype::F32
            }
        })
    };
    let copied: Vec<usize> = (0..layout.len())
        .filter(|t| !averaged.contains(t))
        .collect();
    let mut spec: Vec<(String, Dtype, Vec<usize>)> = averaged
        .iter()
        .map(|&t| (layout[t].0.clone(), out_dtype(t), layout[t].2.clone()))
        .collect();
    for &t in &copied {
        spec.push((layout[t].0.clone(), where_[n - 1][t].0, layout[t].2.clone()));
    }
    let files = outputs
        .iter()
        .map(|o| OutputFile::create(&o.path, &spec, &o.metadata))
        .collect::<Result<Vec<_>>>()?;
    for file in &files {
        let entries = file.entries();
        for (k, &t) in copied.iter().enumerate() {
            file.write_at(entries[averaged.len() + k].1, last.bytes(&layout[t].0)?)?;
        }
    }
    let data_offset = |k: usize| files[0].entries()[k].1 - files[0].data_start();
    let items: Vec<Item> = averaged
        .iter()
        .enumerate()
        .flat_map(|(k, &t)| {
            // Offsets from the start of tensor data, in the output dtype's element size.
            let (begin, out) = (data_offset(k), spec[k].1);
            (0..numel(t)).step_by(CHUNK).map(move |lo| Item {
                tensor: t,
                lo,
                hi: (lo + CHUNK).min(numel(t)),
                at: begin + lo * (out.bitsize() / 8),
                dtype: out,
            })
        })
        .collect();
    let weights: Vec<f32> = coefs.iter().map(|&c| c as f32).collect(); // [in][out]
    let total = items.len();
    let per_batch = total.div_ceil(100).max(1);
    let mut done = 0;
    let buffers: Vec<std::sync::Mutex<Buffers>> = (0..rayon::current_num_threads().max(1))
        .map(|_| {
            std::sync::Mutex::new(Buffers {
                scratch: vec![0.0; GROUP * (SUB + PAD)],
                local: vec![0.0; m * (CHUNK + PAD)],
                words: vec![0; CHUNK],
            })
        })
        .collect();
    // Per input: byte ranges read so far, and the part of them already released.
    let mut consumed: Vec<(Intervals, Intervals)> = (0..n).map(|_| Default::default()).collect();
    // Each batch is computed while the previous one's housekeeping runs next to it: its part
    // of every output is final, so its writeback to disk starts (and the fsync at the end
    // finds little left to do), and the input pages it read are released.
    let housekeeping = |batch: &[Item], consumed: &mut [(Intervals, Intervals)]| {
        let (head, tail) = (batch[0], batch[batch.len() - 1]);
        for file in &files {
            let base = file.data_start();
            file.start_writeback(base + head.at, base + tail.end());
        }
        for ((i, snap), (read, released)) in snaps.iter().enumerate().zip(consumed.iter_mut()) {
            let ranges: Vec<(usize, usize)> = batch
                .iter()
                .map(
                    |&Item {
                         tensor: t, lo, hi, ..
                     }| {
                        let (dtype, begin) = where_[i][t];
                        let size = dtype.bitsize() / 8;
                        (begin + lo * size, begin + hi * size)
                    },
                )
                .collect();
            for &(a, b) in &ranges {
                read.insert(a, b);
            }
            // The merged ranges that grew; release what they newly cover in whole pages.
            let grown: BTreeSet<(usize, usize)> =
                ranges.iter().map(|&(a, _)| read.containing(a)).collect();
            for (a, b) in grown {
                let (a, b) = (a.div_ceil(PAGE) * PAGE, b / PAGE * PAGE);
                for (x, y) in released.gaps(a, b) {
                    snap.release(x, y);
                }
                if b > a {
                    released.insert(a, b);
                }
            }
        }
    };
    let mut previous: Option<&[Item]> = None;
    for batch in items.chunks(per_batch) {
        let (computed, ()) = rayon::join(
            || {
                batch.par_iter().try_for_each(|item| {
                    let slot = rayon::current_thread_index().unwrap_or(0) % buffers.len();
                    let mut guard = buffers[slot].lock().unwrap_or_else(|e| e.into_inner());
                    let name = &layout[item.tensor].0;
                    combine_item(&snaps, &where_, &weights, *item, name, &mut guard, &files)
                })
            },
            || {
                if let Some(prev) = previous {
                    housekeeping(prev, &mut consumed);
                }
            },
        );
        computed?;
        previous = Some(batch);
        done += batch.len();
        progress(done, total)?;
    }
    if let Some(prev) = previous {
        housekeeping(prev, &mut consumed);
    }

    OutputFile::commit_all(files)?;
    Ok(())
}

#[cfg(target_endian = "big")]
compile_error!("safetensors data is little-endian; this crate assumes a little-endian host");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_accumulation_equals_the_sequential_sum_bitwise() {
        // Every block shape and remainder: m outputs and k inputs from 1 to 19, odd lengths.
        let mut state = 0x9e37_79b9_u64;
        let mut rand = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        for (m, k, len) in [
            (1, 1, 1),
            (3, 5, 17),
            (8, 8, 64),
            (9, 7, 33),
            (19, 19, 5),
            (16, 3, 8),
        ] {
            let w: Vec<f32> = (0..k * m).map(|_| rand()).collect();
            let x: Vec<Vec<f32>> = (0..k).map(|_| (0..len).map(|_| rand()).collect()).collect();
            let y0: Vec<Vec<f32>> = (0..m).map(|_| (0..len).map(|_| rand()).collect()).collect();
            let mut want = y0.clone();
            for (j, row) in want.iter_mut().enumerate() {
                for (e, v) in row.iter_mut().enumerate() {
                    for (i, xi) in x.iter().enumerate() {
                        *v += w[i * m + j] * xi[e];
                    }
                }
            }
            let mut got = y0.clone();
            let xs: Vec<&[f32]> = x.iter().map(|v| v.as_slice()).collect();
            for start in (0..k).step_by(GROUP) {
                let end = (start + GROUP).min(k);
                let mut ys: Vec<&mut [f32]> = got.iter_mut().map(|v| v.as_mut_slice()).collect();
                accumulate(&w[start * m..end * m], &xs[start..end], &mut ys);
            }
            for j in 0..m {
                for e in 0..len {
                    assert_eq!(
                        got[j][e].to_bits(),
                        want[j][e].to_bits(),
                        "m={m} k={k} j={j} e={e}"
                    );
                }
            }
        }
    }

    #[test]
    fn intervals_merge_and_report_gaps() {
        let mut s = Intervals::default();
        assert_eq!(s.insert(10, 20), (10, 20));
        assert_eq!(s.insert(30, 40), (30, 40));
        assert_eq!(s.gaps(0, 50), vec![(0, 10), (20, 30), (40, 50)]);
        assert_eq!(s.gaps(12, 18), vec![]);
        assert_eq!(s.gaps(15, 35), vec![(20, 30)]);
        assert_eq!(s.insert(20, 30), (10, 40)); // touching ranges merge
        assert_eq!(s.containing(25), (10, 40));
        assert_eq!(s.0.len(), 1);
        assert_eq!(s.insert(5, 45), (5, 45));
        assert_eq!(s.insert(50, 60), (50, 60));
        assert_eq!(s.gaps(0, 70), vec![(0, 5), (45, 50), (60, 70)]);
        assert_eq!(s.gaps(7, 7), vec![]);
        assert_eq!(s.gaps(9, 3), vec![]);
    }

    #[test]
    fn half_precision_conversion() {
        let cases = [
            (0x3c00u16, 1.0f32),
            (0xc000, -2.0),
            (0x0001, 5.960_464_5e-8), // subnormal
            (0x7bff, 65504.0),
            (0x0000, 0.0),
            (0xfc00, f32::NEG_INFINITY),
        ];
        let mut bytes: Vec<u8> = cases.iter().flat_map(|(h, _)| h.to_le_bytes()).collect();
        for offset in [0, 1] {
            // Aligned (vectorised) and misaligned (element-wise) inputs give the same values.
            if offset == 1 {
                bytes.insert(0, 0xaa);
            }
            let mut out = vec![0.0f32; cases.len()];
            to_f32(Dtype::F16, &bytes[offset..], &mut out);
            for ((h, want), got) in cases.iter().zip(&out) {
                assert_eq!(got.to_bits(), want.to_bits(), "{h:#x}");
            }
        }
        let mut out = [0.0f32; 2];
        to_f32(Dtype::F16, &0x7e00u16.to_le_bytes().repeat(2), &mut out);
        assert!(out[0].is_nan());
        to_f32(Dtype::BF16, &[0x80, 0x3f, 0x00, 0xc0], &mut out);
        assert_eq!(out, [1.0, -2.0]);
        to_f32(Dtype::BF16, &[0xaa, 0x80, 0x3f, 0x00, 0xc0][1..], &mut out);
        assert_eq!(out, [1.0, -2.0]);
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("autoguide-posthoc-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Writes one snapshot of (name, dtype, bits) tensors; 16-bit tensors are given as u16 bits,
    /// float32 ones as f32 bits, I64 ones as i64 values.
    fn write(path: &std::path::Path, tensors: &[(&str, Dtype, Vec<u64>)]) {
        let data: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, d, v)| match d {
                Dtype::F16 | Dtype::BF16 => {
                    v.iter().flat_map(|&b| (b as u16).to_le_bytes()).collect()
                }
                Dtype::F32 => v.iter().flat_map(|&b| (b as u32).to_le_bytes()).collect(),
                _ => v.iter().flat_map(|&b| b.to_le_bytes()).collect(),
            })
            .collect();
        let views: Vec<crate::store::TensorData> = tensors
            .iter()
            .zip(&data)
            .map(|((name, dtype, v), bytes)| crate::store::TensorData {
                name: name.to_string(),
                dtype: *dtype,
                shape: vec![v.len()],
                data: bytes,
            })
            .collect();
        crate::store::write_atomic(path, &views, &BTreeMap::new()).unwrap();
    }

    /// (dtype, values as f64) of every tensor of the snapshot at `path`.
    fn read(path: &std::path::Path) -> BTreeMap<String, (Dtype, Vec<u64>)> {
        let snap = MappedSnapshot::open(path).unwrap();
        snap.header()
            .tensors
            .iter()
            .map(|t| {
                let bytes = snap.bytes(&t.name).unwrap();
                let bits: Vec<u64> = match t.dtype {
                    Dtype::F16 | Dtype::BF16 => bytes
                        .chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]) as u64)
                        .collect(),
                    Dtype::F32 => bytes
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as u64)
                        .collect(),
                    _ => bytes
                        .chunks_exact(8)
                        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                        .collect(),
                };
                (t.name.clone(), (t.dtype, bits))
            })
            .collect()
    }

    fn value(dtype: Dtype, bits: u64) -> f64 {
        match dtype {
            Dtype::F16 => half::f16::from_bits(bits as u16).to_f64(),
            Dtype::BF16 => half::bf16::from_bits(bits as u16).to_f64(),
            Dtype::F32 => f32::from_bits(bits as u32) as f64,
            _ => unreachable!(),
        }
    }

    /// `sum` rounded once to `dtype`, as bits. The sums of these tests are exact in float32, so
    /// the float32 accumulation is exact and rounding it is rounding the true sum once.
    fn rounded(dtype: Dtype, sum: f64) -> u64 {
        let x = sum as f32;
        assert_eq!(x as f64, sum, "the test's sums must be exact in float32");
        match dtype {
            Dtype::F16 => half::f16::from_f32(x).to_bits() as u64,
            Dtype::BF16 => half::bf16::from_f32(x).to_bits() as u64,
            Dtype::F32 => x.to_bits() as u64,
            _ => unreachable!(),
        }
    }

    #[test]
    fn outputs_are_the_exact_sum_rounded_once_to_the_inputs_dtype() {
        // 9 inputs (a group of 8 and 1), 3 outputs. Values of magnitude in [1, 2) with at most
        // 11 significant bits and weights k/16, |k| <= 16: every product and partial sum is a
        // multiple of 2^-14 below 2^5, exact in float32, so the expected output is the exact sum
        // rounded once. "a" spans two work chunks and has an odd length (the 16-bit output
        // shifts every later tensor by 2 bytes); "mixed" is float16 in one input and float32 in
        // the others; "step" is an integer tensor, copied from the last input.
        let dir = tmpdir("round");
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut rand = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let (n, m) = (9, 3);
        let f16_in_1_2 = |r: u64| 0x3c00 | (r & 0x3ff) | (r >> 63 << 15);
        let bf16_in_1_2 = |r: u64| 0x3f80 | (r & 0x7f) | (r >> 63 << 15);
        let mut inputs = Vec::new();
        let mut values: Vec<BTreeMap<String, Vec<f64>>> = Vec::new();
        for i in 0..n {
            let a: Vec<u64> = (0..CHUNK + 4001).map(|_| f16_in_1_2(rand())).collect();
            let b: Vec<u64> = (0..37).map(|_| bf16_in_1_2(rand())).collect();
            let mixed_dtype = if i == 4 { Dtype::F16 } else { Dtype::F32 };
            let mixed: Vec<u64> = (0..5)
                .map(|_| {
                    let h = f16_in_1_2(rand());
                    match mixed_dtype {
                        Dtype::F16 => h,
                        _ => (value(Dtype::F16, h) as f32).to_bits() as u64,
                    }
                })
                .collect();
            let tensors = [
                ("a", Dtype::F16, a),
                ("b", Dtype::BF16, b),
                ("mixed", mixed_dtype, mixed),
                ("step", Dtype::I64, vec![i as u64, 7]),
            ];
            values.push(
                tensors
                    .iter()
                    .filter(|(name, ..)| *name != "step")
                    .map(|(name, d, v)| {
                        (name.to_string(), v.iter().map(|&b| value(*d, b)).collect())
                    })
                    .collect(),
            );
            let path = dir.join(format!("in-{i}.safetensors"));
            write(&path, &tensors);
            inputs.push(path);
        }
        let coefs: Vec<f64> = (0..n * m)
            .map(|_| (rand() % 33) as f64 / 16.0 - 1.0)
            .collect();
        let copy = BTreeSet::from(["step".to_string()]);
        for (tag, dtype) in [
            ("same", None),
            ("bf16", Some(Dtype::BF16)),
            ("f16", Some(Dtype::F16)),
        ] {
            let outputs: Vec<Output> = (0..m)
                .map(|j| Output {
                    path: dir.join(format!("{tag}-{j}.safetensors")),
                    metadata: BTreeMap::new(),
                })
                .collect();
            reconstruct(&inputs, &coefs, &outputs, &copy, dtype, |_, _| Ok(())).unwrap();
            for (j, out) in outputs.iter().enumerate() {
                let got = read(&out.path);
                assert_eq!(got["step"], (Dtype::I64, vec![n as u64 - 1, 7]), "{tag}");
                for (name, input_dtype) in
                    [("a", Dtype::F16), ("b", Dtype::BF16), ("mixed", Dtype::F32)]
                {
                    let want_dtype = dtype.unwrap_or(input_dtype);
                    let (got_dtype, bits) = &got[name];
                    assert_eq!(*got_dtype, want_dtype, "{tag} {name}");
                    for (e, &b) in bits.iter().enumerate() {
                        let sum: f64 = (0..n).map(|i| coefs[i * m + j] * values[i][name][e]).sum();
                        assert_eq!(b, rounded(want_dtype, sum), "{tag} output {j} {name}[{e}]");
                    }
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        // Means of two float16 inputs that fall exactly halfway between neighbours of the
        // output dtype round to the one with an even last bit; known bits, independent of the
        // `half` crate.
        let dir = tmpdir("ties");
        let one = 0x3c00u64; // float16 1.0; + k is 1 + k * 2^-10
        let inputs = [dir.join("x.safetensors"), dir.join("y.safetensors")];
        write(
            &inputs[0],
            &[("t", Dtype::F16, vec![one, one + 1, one, one + 8])],
        );
        write(
            &inputs[1],
            &[("t", Dtype::F16, vec![one + 1, one + 2, one + 8, one + 16])],
        );
        // Means: 1 + 2^-11, 1 + 3 * 2^-11, 1 + 2^-8, 1 + 3 * 2^-8.
        for (dtype, want) in [
            (Dtype::F16, [0x3c00, 0x3c02, 0x3c04, 0x3c0c]),
            (Dtype::BF16, [0x3f80, 0x3f80, 0x3f80, 0x3f82]),
        ] {
            let out = Output {
                path: dir.join("o.safetensors"),
                metadata: BTreeMap::new(),
            };
            let copy = BTreeSet::new();
            reconstruct(
                &inputs,
                &[0.5, 0.5],
                std::slice::from_ref(&out),
                &copy,
                Some(dtype),
                |_, _| Ok(()),
            )
            .unwrap();
            assert_eq!(read(&out.path)["t"], (dtype, want.to_vec()), "{dtype}");
        }
        let err = reconstruct(
            &inputs,
            &[0.5, 0.5],
            &[Output {
                path: dir.join("never.safetensors"),
                metadata: BTreeMap::new(),
            }],
            &BTreeSet::new(),
            Some(Dtype::I64),
            |_, _| Ok(()),
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("dtype must be"), "{err}");
        assert!(!dir.join("never.safetensors").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn float16_conversions_match_the_half_crate() {
        // Every float16 value widened; random float32 values, and every midpoint between
        // neighbouring float16 values (ties), narrowed; lengths with and without a tail.
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let mut wide = vec![0.0f32; all.len()];
        f16_to_f32(&all[3..], &mut wide[3..]);
        for (&h, w) in all.iter().zip(&wide).skip(3) {
            assert_eq!(
                w.to_bits(),
                half::f16::from_bits(h).to_f32().to_bits(),
                "{h:#x}"
            );
        }
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut x: Vec<f32> = (0..1 << 16)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                f32::from_bits((state >> 32) as u32)
            })
            .collect();
        x.extend((0..0x7bffu16).map(|h| {
            let (a, b) = (half::f16::from_bits(h), half::f16::from_bits(h + 1));
            ((a.to_f64() + b.to_f64()) / 2.0) as f32 // exact: float32 has 13 more bits
        }));
        x.extend([65520.0, 65519.99, f32::INFINITY, f32::NAN, -0.0, 1e-8, 3e-8]);
        let mut narrow = vec![0u16; x.len()];
        f32_to_f16(&x[1..], &mut narrow[1..]);
        for (&v, &h) in x.iter().zip(&narrow).skip(1) {
            assert_eq!(h, half::f16::from_f32(v).to_bits(), "{v:e}");
        }
    }

    #[test]
    fn non_finite_outputs_are_refused_naming_the_tensor_and_the_input() {
        // "w" spans two work chunks; input 1 holds a NaN in the second one. Nothing is written.
        let dir = tmpdir("nonfinite");
        let one = 0x3f80_0000u64; // float32 1.0
        let mut w = vec![one; CHUNK + 5];
        let inputs = [dir.join("a.safetensors"), dir.join("b.safetensors")];
        write(
            &inputs[0],
            &[("g", Dtype::F32, vec![one]), ("w", Dtype::F32, w.clone())],
        );
        w[CHUNK + 3] = f32::NAN.to_bits() as u64;
        write(
            &inputs[1],
            &[("g", Dtype::F32, vec![one]), ("w", Dtype::F32, w)],
        );
        let outputs: Vec<Output> = (0..2)
            .map(|j| Output {
                path: dir.join(format!("o{j}.safetensors")),
                metadata: BTreeMap::new(),
            })
            .collect();
        let listing = || {
            let mut names: Vec<_> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            names
        };
        let copy = BTreeSet::new();
        for dtype in [None, Some(Dtype::F16), Some(Dtype::BF16)] {
            let err = reconstruct(
                &inputs,
                &[0.5, 0.5, 0.0, 1.0],
                &outputs,
                &copy,
                dtype,
                |_, _| Ok(()),
            )
            .unwrap_err();
            match &err {
                Error::NonFinite { tensor, cause, .. } => {
                    assert_eq!(tensor, "w");
                    assert!(cause.contains("b.safetensors"), "{err}");
                }
                other => panic!("expected NonFinite, got {other:?}"),
            }
            assert_eq!(listing(), ["a.safetensors", "b.safetensors"], "{dtype:?}");
        }
        // Finite inputs whose weighted sum overflows float16: named as an overflow.
        let big = 0x7800u64; // float16 32768
        write(&inputs[0], &[("h", Dtype::F16, vec![big, 0x3c00])]);
        write(&inputs[1], &[("h", Dtype::F16, vec![big, 0x3c00])]);
        let err = reconstruct(&inputs, &[1.0, 1.0], &outputs[..1], &copy, None, |_, _| {
            Ok(())
        })
        .unwrap_err();
        assert!(
            matches!(&err, Error::NonFinite { tensor, cause, .. }
                if tensor == "h" && cause.contains("overflows F16")),
            "{err}"
        );
        assert!(err.to_string().contains("o0.safetensors"), "{err}");
        // The same sum fits float32.
        reconstruct(
            &inputs,
            &[1.0, 1.0],
            &outputs[..1],
            &copy,
            Some(Dtype::F32),
            |_, _| Ok(()),
        )
        .unwrap();
        assert_eq!(
            read(&outputs[0].path)["h"].1,
            vec![0x4780_0000, 0x4000_0000]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn counts_are_bounded_before_anything_is_allocated_or_opened() {
        let big = vec![1.0; MAX_SNAPSHOTS + 1];
        let err = solve_coefficients(&big, &big, &[1.0], &[0.1]).unwrap_err();
        assert!(
            err.to_string().starts_with("in_nimg must be at most 4096"),
            "{err}"
        );
        let many = vec![1.0; MAX_PROFILES + 1];
        let err = solve_coefficients(&[1.0], &[0.1], &many, &many).unwrap_err();
        assert!(
            err.to_string().starts_with("out_nimg must be at most 4096"),
            "{err}"
        );
        // Paths that do not exist: the count is refused before any file is opened.
        let missing = PathBuf::from("/nonexistent/x.safetensors");
        let outputs = vec![
            Output {
                path: missing.clone(),
                metadata: BTreeMap::new(),
            };
            MAX_OUTPUTS + 1
        ];
        let coefs = vec![1.0; MAX_OUTPUTS + 1];
        let err = reconstruct(
            std::slice::from_ref(&missing),
            &coefs,
            &outputs,
            &BTreeSet::new(),
            None,
            |_, _| Ok(()),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "outputs must be at most 256 files per pass, got 257"
        );
        let inputs = vec![missing; MAX_SNAPSHOTS + 1];
        let err = reconstruct(
            &inputs,
            &vec![1.0; MAX_SNAPSHOTS + 1],
            &outputs[..1],
            &BTreeSet::new(),
            None,
            |_, _| Ok(()),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "inputs must be at most 4096 snapshots, got 4097"
        );
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
