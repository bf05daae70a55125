//! The score of the toy experiment's log-density MLP (`networks/toy.py`, `ToyModel`) in float32
//! on CPUs with AVX-512: the forward pass and its backward pass in `x` (what sampling evaluates 63
//! times per run), and for training the loss's gradients in the weights; in blocks of 96 points,
//! layer by layer (each layer's weights stay in the L1 cache while the block passes, the block's
//! activations in L2), with the GEMMs' sums in registers and the elementwise steps in their
//! epilogues.
//!
//! Notation as `ToyModel._score_explicit`: `u = (x c_in, ln(sigma) / 4, 1)` with `c_in = 1 /
//! sqrt(sigma_data^2 + sigma^2)`, `h_0 = V_0 u`, `h_l = V_l silu(h_{l-1})`, `d_L = k h_L` with
//! `k = 2 gain / (sigma H)`, `d_{l-1} = (V_l^T d_l) silu'(h_{l-1})`, and the score `c_in (V_0^T
//! d_0)[:2] - x c_in^2`. The weights are the applied ones (normalised, and `V_l` for `l >= 1`
//! already divided by silu's standard deviation).

use rayon::prelude::*;

use crate::error::{invalid, two_per_point, Error, Result};

/// Inputs of the first layer: the 2-D point (scaled), `ln(sigma) / 4` and 1.
const INPUTS: usize = 4;

/// A toy MLP's applied weights in float32.
#[derive(Debug, Clone)]
pub struct ToyMlp {
    hidden: usize,
    sigma_data: f32,
    gain: f32,
    /// `V_0^T`, [4, H] row-major.
    v0t: Vec<f32>,
    /// The columns of `V_0[:, :2]`, [2, H].
    v0c: Vec<f32>,
    /// `V_l^T` ([H_in, H_out] row-major) and `V_l` ([H_out, H_in]) for l = 1 .. L.
    vt: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl ToyMlp {
    /// Whether [`ToyMlp::score`] runs on this CPU for `hidden` features (AVX-512F, and 16, 32
    /// or 64 features).
    pub fn available(hidden: usize) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            matches!(hidden, 16 | 32 | 64) && std::arch::is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = hidden;
            false
        }
    }

    /// `v0`: the first layer's applied weight [H, 4] row-major; `layers`: the hidden layers'
    /// applied weights, each [H, H] row-major (out, in).
    pub fn new(sigma_data: f32, gain: f32, v0: &[f32], layers: &[Vec<f32>]) -> Result<Self> {
        if !(sigma_data.is_finite() && sigma_data > 0.0) {
            return Err(invalid("sigma_data", sigma_data, "finite and > 0"));
        }
        if !gain.is_finite() {
            return Err(invalid("gain", gain, "finite"));
        }
        if !v0.len().is_multiple_of(INPUTS) || v0.is_empty() {
            return Err(invalid("v0", v0.len(), "H x 4 values"));
        }
        let h = v0.len() / INPUTS;
        if !Self::available(h) {
            return Err(invalid(
                "hidden",
                h,
                "16, 32 or 64 on a CPU with AVX-512 (ToyMlp::available)",
            ));
        }
        for w in layers {
            if w.len() != h * h {
                return Err(Error::ShapeMismatch {
                    what: "hidden layer weight (H x H values)",
                    expected: h * h,
                    got: w.len(),
                });
            }
        }
        if let Some(bad) = v0
            .iter()
            .chain(layers.iter().flatten())
            .find(|w| !w.is_finite())
        {
            return Err(invalid("weights", bad, "finite"));
        }
        let transpose = |w: &[f32], rows: usize, cols: usize| {
            let mut t = vec![0.0f32; rows * cols];
            for r in 0..rows {
                for c in 0..cols {
                    t[c * rows + r] = w[r * cols + c];
                }
            }
            t
        };
        Ok(Self {
            hidden: h,
            sigma_data,
            gain,
            v0t: transpose(v0, h, INPUTS),
            v0c: (0..2)
                .flat_map(|j| (0..h).map(move |o| v0[o * INPUTS + j]))
                .collect(),
            vt: layers.iter().map(|w| transpose(w, h, h)).collect(),
            v: layers.to_vec(),
        })
    }

    /// The score at points `x` ([N, 2] row-major) and noise levels `sigma` ([N], > 0): [N, 2].
    pub fn score(&self, x: &[f32], sigma: &[f32]) -> Result<Vec<f32>> {
        let n = sigma.len();
        two_per_point("x (2 values per point)", x, n)?;
        if let Some(bad) = sigma.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(invalid("sigma", bad, "finite and > 0"));
        }
        if let Some(bad) = x.iter().find(|v| !v.is_finite()) {
            return Err(invalid("x", bad, "finite"));
        }
        let mut out = vec![0.0f32; 2 * n];
        let p = avx512::P;
        #[cfg(target_arch = "x86_64")]
        out.par_chunks_mut(2 * p)
            .zip(x.par_chunks(2 * p).zip(sigma.par_chunks(p)))
            .for_each(|(out, (x, sigma))| {
                avx512::with_scratch(self.hidden, self.vt.len(), |scratch| {
                    // SAFETY: `new` admitted these weights only where `available` holds (AVX-512F).
                    unsafe {
                        match self.hidden {
                            16 => avx512::score_block::<1>(self, x, sigma, out, scratch),
                            32 => avx512::score_block::<2>(self, x, sigma, out, scratch),
                            _ => avx512::score_block::<4>(self, x, sigma, out, scratch),
                        }
                    }
                })
            });
        Ok(out)
    }
}

/// The loss of one model on one batch and its gradients in the applied weights.
#[derive(Debug, Clone)]
pub struct TrainGradients {
    /// `mean_n sigma^2 mean_j (score - target)^2`.
    pub loss: f64,
    /// d loss / d gain.
    pub gain: f64,
    /// d loss / d V_0, [H, 4] row-major.
    pub v0: Vec<f32>,
    /// d loss / d V_l for l = 1 .. L, each [H, H] row-major.
    pub layers: Vec<Vec<f32>>,
}

/// Training blocks per parallel task: the partial sums of tasks are added in task order, so the
/// result does not depend on how the threads took the tasks.
const BLOCKS_PER_TASK: usize = 8;

/// One model's batch for [`ToyMlp::train_many`].
#[derive(Debug, Clone, Copy)]
pub struct TrainBatch<'a> {
    pub net: &'a ToyMlp,
    /// Points [N, 2] row-major.
    pub x: &'a [f32],
    /// Noise levels [N], > 0.
    pub sigma: &'a [f32],
    /// Target scores [N, 2] row-major.
    pub target: &'a [f32],
}

impl ToyMlp {
    /// The exact-score-matching loss `mean_n sigma^2 mean_j (score - target)^2` of points `x`
    /// ([N, 2]) at noise levels `sigma` ([N], > 0) against `target` scores ([N, 2]), and its
    /// gradients in the applied weights (as `ToyStack.loss_backward` before the weights'
    /// normalisation), in float32 (sums of the loss and the gain's gradient in float64).
    pub fn train_gradients(
        &self,
        x: &[f32],
        sigma: &[f32],
        target: &[f32],
    ) -> Result<TrainGradients> {
        let batch = TrainBatch {
            net: self,
            x,
            sigma,
            target,
        };
        Ok(Self::train_many(&[batch])?.remove(0))
    }

    /// [`ToyMlp::train_gradients`] of several models of one shape, each on its own batch, as
    /// one parallel job (the blocks of all models share the threads); each model's result is
    /// the same, bit for bit, as from its own call.
    pub fn train_many(batches: &[TrainBatch<'_>]) -> Result<Vec<TrainGradients>> {
        let Some(first) = batches.first() else {
            return Ok(vec![]);
        };
        let (h, layers) = (first.net.hidden, first.net.vt.len());
        for b in batches {
            let n = b.sigma.len();
            two_per_point("x (2 values per point)", b.x, n)?;
            two_per_point("target (2 values per point)", b.target, n)?;
            if let Some(bad) = b.sigma.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
                return Err(invalid("sigma", bad, "finite and > 0"));
            }
            if let Some(bad) = b.x.iter().chain(b.target).find(|v| !v.is_finite()) {
                return Err(invalid("x and target", bad, "finite"));
            }
            if (b.net.hidden, b.net.vt.len()) != (h, layers) {
                return Err(invalid(
                    "models",
                    format!("{} x {}", b.net.vt.len(), b.net.hidden),
                    "of one shape (hidden layers x features) in one call",
                ));
            }
        }
        // Tasks of BLOCKS_PER_TASK blocks of one model each, in model order.
        let task = BLOCKS_PER_TASK * avx512::P;
        let tasks: Vec<(usize, usize)> = batches
            .iter()
            .enumerate()
            .flat_map(|(m, b)| (0..b.sigma.len()).step_by(task).map(move |s| (m, s)))
            .collect();
        let sums: Vec<avx512::TrainSums> = tasks
            .par_iter()
            .map(|&(m, start)| {
                avx512::with_scratch(h, layers, |scratch| {
                    let TrainBatch {
                        net,
                        x,
                        sigma,
                        target,
                    } = batches[m];
                    let n = sigma.len();
                    let end = (start + task).min(n);
                    let mut sums = avx512::TrainSums {
                        loss: 0.0,
                        gain: 0.0,
                        g0t: vec![0.0; INPUTS * h],
                        g: vec![vec![0.0; h * h]; layers],
                    };
                    let p = avx512::P;
                    for b in (start..end).step_by(p) {
                        let e = (b + p).min(end);
                        let (x, sigma, target) =
                            (&x[2 * b..2 * e], &sigma[b..e], &target[2 * b..2 * e]);
                        // SAFETY: `new` admitted these weights only where `available` holds (AVX-512F).
                        unsafe {
                            match h {
                                16 => avx512::train_block::<1>(
                                    net, x, sigma, target, n, &mut sums, scratch,
                                ),
                                32 => avx512::train_block::<2>(
                                    net, x, sigma, target, n, &mut sums, scratch,
                                ),
                                _ => avx512::train_block::<4>(
                                    net, x, sigma, target, n, &mut sums, scratch,
                                ),
                            }
                        }
                    }
                    sums
                })
            })
            .collect();
        // Each model's task sums, added in task order.
        let mut out: Vec<TrainGradients> = batches
            .iter()
            .map(|_| TrainGradients {
                loss: 0.0,
                gain: 0.0,
                v0: vec![0.0; h * INPUTS],
                layers: vec![vec![0.0; h * h]; layers],
            })
            .collect();
        let mut g0t = vec![vec![0.0f32; INPUTS * h]; batches.len()];
        for (&(m, _), t) in tasks.iter().zip(&sums) {
            let o = &mut out[m];
            o.loss += t.loss;
            o.gain += t.gain;
            for (o, v) in g0t[m].iter_mut().zip(&t.g0t) {
                *o += v;
            }
            for (o, g) in o.layers.iter_mut().zip(&t.g) {
                for (o, v) in o.iter_mut().zip(g) {
                    *o += v;
                }
            }
        }
        for (o, g0t) in out.iter_mut().zip(&g0t) {
            for r in 0..h {
                for i in 0..INPUTS {
                    o.v0[r * INPUTS + i] = g0t[i * h + r];
                }
            }
        }
        Ok(out)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{ToyMlp, INPUTS};
    use crate::simd::exp_f32x16;

    /// `C[r, :] (+)= sum_kk A(r, kk) B[kk, :]` for `R` rows: `A(r, kk) = a[r lda + kk]`, or
    /// `a[kk lda + r]` with `TA`; `B` [k, 16 HV] row-major; `C` rows of 16 HV; `ACC` adds to C.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn gemm<const HV: usize, const R: usize, const TA: bool, const ACC: bool>(
        a: *const f32,
        lda: usize,
        k: usize,
        b: *const f32,
        c: *mut f32,
    ) {
        let h = 16 * HV;
        let mut acc = [[_mm512_setzero_ps(); HV]; R];
        if ACC {
            for (r, row) in acc.iter_mut().enumerate() {
                for (q, v) in row.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(c.add(r * h + 16 * q));
                }
            }
        }
        for kk in 0..k {
            let bp = b.add(kk * h);
            let mut bv = [_mm512_setzero_ps(); HV];
            for (q, v) in bv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(bp.add(16 * q));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let x = if TA {
                    *a.add(kk * lda + r)
                } else {
                    *a.add(r * lda + kk)
                };
                let x = _mm512_set1_ps(x);
                for (v, &w) in row.iter_mut().zip(&bv) {
                    *v = _mm512_fmadd_ps(x, w, *v);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (q, &v) in row.iter().enumerate() {
                _mm512_storeu_ps(c.add(r * h + 16 * q), v);
            }
        }
    }

    /// [`gemm`] over `rows` rows, six at a time (twelve at 32 features or fewer).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn matmul<const HV: usize, const TA: bool, const ACC: bool>(
        a: &[f32],
        lda: usize,
        k: usize,
        b: &[f32],
        c: &mut [f32],
        rows: usize,
    ) {
        let h = 16 * HV;
        debug_assert!(b.len() >= k * h && c.len() >= rows * h);
        debug_assert!(if TA {
            a.len() >= (k - 1) * lda + rows
        } else {
            a.len() >= (rows - 1) * lda + k
        });
        let (a, b, c) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
        let at = |r: usize| if TA { a.add(r) } else { a.add(r * lda) };
        let mut r = 0;
        if HV <= 2 {
            while r + 12 <= rows {
                gemm::<HV, 12, TA, ACC>(at(r), lda, k, b, c.add(r * h));
                r += 12;
            }
        }
        while r + 6 <= rows {
            gemm::<HV, 6, TA, ACC>(at(r), lda, k, b, c.add(r * h));
            r += 6;
        }
        match rows - r {
            0 => {}
            1 => gemm::<HV, 1, TA, ACC>(at(r), lda, k, b, c.add(r * h)),
            2 => gemm::<HV, 2, TA, ACC>(at(r), lda, k, b, c.add(r * h)),
            3 => gemm::<HV, 3, TA, ACC>(at(r), lda, k, b, c.add(r * h)),
            4 => gemm::<HV, 4, TA, ACC>(at(r), lda, k, b, c.add(r * h)),
            _ => gemm::<HV, 5, TA, ACC>(at(r), lda, k, b, c.add(r * h)),
        }
    }

    /// `epi(r, i, sum)` for the sums of `R` rows `r0 ..` of `A B` (`A(r, kk) = a[r lda + kk]`, `B`
    /// [k, 16 HV] row-major), 16 columns at a time from offset `i = r h + 16 q` of row-major rows
    /// of `h = 16 HV`: the GEMM's epilogue works on its sums in registers. `epi` may write rows
    /// `r0 .. r0 + R` of `A` itself: they are read in full before.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn gemm_epi<const HV: usize, const R: usize, F: FnMut(usize, usize, __m512)>(
        a: *const f32,
        lda: usize,
        k: usize,
        b: *const f32,
        r0: usize,
        epi: &mut F,
    ) {
        let h = 16 * HV;
        let mut acc = [[_mm512_setzero_ps(); HV]; R];
        for kk in 0..k {
            let bp = b.add(kk * h);
            let mut bv = [_mm512_setzero_ps(); HV];
            for (q, v) in bv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(bp.add(16 * q));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*a.add((r0 + r) * lda + kk));
                for (v, &w) in row.iter_mut().zip(&bv) {
                    *v = _mm512_fmadd_ps(x, w, *v);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (q, &v) in row.iter().enumerate() {
                epi(r0 + r, (r0 + r) * h + 16 * q, v);
            }
        }
    }

    /// [`gemm_epi`] over `rows` rows, six at a time (twelve at 32 features or fewer).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn matmul_epi<const HV: usize, F: FnMut(usize, usize, __m512)>(
        a: *const f32,
        lda: usize,
        k: usize,
        b: &[f32],
        rows: usize,
        mut epi: F,
    ) {
        debug_assert!(b.len() >= k * 16 * HV);
        let (b, mut r) = (b.as_ptr(), 0);
        if HV <= 2 {
            // 12 rows: 24 sums in registers as 6 rows do at 64 features (+10% at 32, measured).
            while r + 12 <= rows {
                gemm_epi::<HV, 12, F>(a, lda, k, b, r, &mut epi);
                r += 12;
            }
        }
        while r + 6 <= rows {
            gemm_epi::<HV, 6, F>(a, lda, k, b, r, &mut epi);
            r += 6;
        }
        match rows - r {
            0 => {}
            1 => gemm_epi::<HV, 1, F>(a, lda, k, b, r, &mut epi),
            2 => gemm_epi::<HV, 2, F>(a, lda, k, b, r, &mut epi),
            3 => gemm_epi::<HV, 3, F>(a, lda, k, b, r, &mut epi),
            4 => gemm_epi::<HV, 4, F>(a, lda, k, b, r, &mut epi),
            _ => gemm_epi::<HV, 5, F>(a, lda, k, b, r, &mut epi),
        }
    }

    /// Per-thread buffers of one training block of `P` points.
    pub(super) struct TrainScratch {
        u: Vec<f32>,
        c_in: Vec<f32>,
        k: Vec<f32>,
        s_bar: Vec<f32>,
        h: Vec<f32>,
        d_bar: Vec<f32>,
        b_bar: Vec<f32>,
        a: Vec<Vec<f32>>,
        d1: Vec<Vec<f32>>,
        d2: Vec<Vec<f32>>,
        d: Vec<Vec<f32>>,
        b: Vec<Vec<f32>>,
        h_bar: Vec<Vec<f32>>,
    }

    /// Points per training block: the block's ~30 activations of P x H stay in the L2 cache.
    pub(super) const P: usize = 96;

    impl TrainScratch {
        pub(super) fn new(hidden: usize, layers: usize) -> Self {
            let m = P * hidden;
            let many = |n: usize| (0..n).map(|_| vec![0.0f32; m]).collect::<Vec<_>>();
            Self {
                u: vec![0.0; P * INPUTS],
                c_in: vec![0.0; P],
                k: vec![0.0; P],
                s_bar: vec![0.0; P * 2],
                h: vec![0.0; m],
                d_bar: vec![0.0; m],
                b_bar: vec![0.0; m],
                a: many(layers),
                d1: many(layers),
                d2: many(layers),
                d: many(layers + 1),
                b: many(layers + 1),
                h_bar: many(layers + 1),
            }
        }
    }

    thread_local! {
        /// Each thread's block buffers, one set per shape (features, layers) it has run.
        static SCRATCH: std::cell::RefCell<Vec<(usize, usize, TrainScratch)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }

    /// Runs `f` with this thread's buffers for blocks of `hidden` features and `layers` hidden
    /// layers (made on the thread's first block of that shape, then reused: a sampling run calls
    /// the kernel thousands of times, and fresh buffers cost a fifth of a call). `f` must not
    /// run the kernel itself.
    pub(super) fn with_scratch<R>(
        hidden: usize,
        layers: usize,
        f: impl FnOnce(&mut TrainScratch) -> R,
    ) -> R {
        SCRATCH.with(|cell| {
            let mut all = cell.borrow_mut();
            let i = match all
                .iter()
                .position(|(h, l, _)| (*h, *l) == (hidden, layers))
            {
                Some(i) => i,
                None => {
                    all.push((hidden, layers, TrainScratch::new(hidden, layers)));
                    all.len() - 1
                }
            };
            f(&mut all[i].2)
        })
    }

    /// Sums of one group of blocks: the loss, the gain's gradient, `G_0^T` [4, H] and `G_l`.
    pub(super) struct TrainSums {
        pub(super) loss: f64,
        pub(super) gain: f64,
        pub(super) g0t: Vec<f32>,
        pub(super) g: Vec<Vec<f32>>,
    }

    /// A block's inputs: `c_in`, `k` and `u` of its `m <= P` points (`x` [m, 2], `sigma` [m]),
    /// padded to `P` with the point (0, 0) at sigma 1.
    #[target_feature(enable = "avx512f")]
    unsafe fn block_inputs<const HV: usize>(
        net: &ToyMlp,
        x: &[f32],
        sigma: &[f32],
        s: &mut TrainScratch,
    ) {
        let h = 16 * HV;
        for t in 0..P {
            let (x0, x1, sg) = if t < sigma.len() {
                (x[2 * t], x[2 * t + 1], sigma[t])
            } else {
                (0.0, 0.0, 1.0)
            };
            let c = 1.0 / (net.sigma_data * net.sigma_data + sg * sg).sqrt();
            s.c_in[t] = c;
            s.k[t] = (2.0 / h as f32) * net.gain / sg;
            s.u[t * INPUTS..(t + 1) * INPUTS].copy_from_slice(&[
                x0 * c,
                x1 * c,
                sg.ln() / 4.0,
                1.0,
            ]);
        }
    }

    /// A block's forward pass and the score's backward pass, to `d_0` (and, with `TRAIN`, what
    /// the adjoints need besides: silu'', `b_l` and `h_L`).
    #[target_feature(enable = "avx512f")]
    unsafe fn forward_score<const HV: usize, const TRAIN: bool>(
        net: &ToyMlp,
        s: &mut TrainScratch,
    ) {
        let h = 16 * HV;
        let layers = net.vt.len();
        // Forward: h_l = V_l a_{l-1} (h_0 = V_0 u), and in the GEMM's epilogue a_l = silu(h_l),
        // silu'(h_l) and silu''(h_l); the last layer's epilogue makes d_L = k h_L.
        let (one, two) = (_mm512_set1_ps(1.0), _mm512_set1_ps(2.0));
        let silu = |ap: *mut f32, d1p: *mut f32, d2p: *mut f32| {
            move |_: usize, i: usize, hv: __m512| {
                let sig = _mm512_div_ps(
                    one,
                    _mm512_add_ps(one, exp_f32x16(_mm512_sub_ps(_mm512_setzero_ps(), hv))),
                );
                let a = _mm512_mul_ps(hv, sig);
                let d1 = _mm512_mul_ps(_mm512_add_ps(_mm512_sub_ps(hv, a), one), sig);
                _mm512_storeu_ps(ap.add(i), a);
                _mm512_storeu_ps(d1p.add(i), d1);
                if TRAIN {
                    let t2 = _mm512_mul_ps(two, _mm512_sub_ps(sig, _mm512_mul_ps(sig, sig)));
                    let d2 = _mm512_fmadd_ps(
                        _mm512_sub_ps(d1, sig),
                        _mm512_fnmadd_ps(two, sig, one),
                        t2,
                    );
                    _mm512_storeu_ps(d2p.add(i), d2);
                }
            }
        };
        let kp = s.k.as_ptr();
        for l in 0..=layers {
            let (a, lda, w) = if l == 0 {
                (s.u.as_ptr(), INPUTS, &net.v0t)
            } else {
                (s.a[l - 1].as_ptr(), h, &net.vt[l - 1])
            };
            if l < layers {
                let epi = silu(
                    s.a[l].as_mut_ptr(),
                    s.d1[l].as_mut_ptr(),
                    s.d2[l].as_mut_ptr(),
                );
                matmul_epi::<HV, _>(a, lda, lda, w, P, epi);
            } else {
                let (hp, dp) = (s.h.as_mut_ptr(), s.d[layers].as_mut_ptr());
                matmul_epi::<HV, _>(a, lda, lda, w, P, |r, i, hv| {
                    if TRAIN {
                        _mm512_storeu_ps(hp.add(i), hv);
                    }
                    _mm512_storeu_ps(dp.add(i), _mm512_mul_ps(hv, _mm512_set1_ps(*kp.add(r))));
                });
            }
        }
        // Score: b_l = d_l V_l, d_{l-1} = b_l silu'(h_{l-1}) (in the epilogue).
        for l in (1..=layers).rev() {
            let (bp, d1p, dp) = (
                s.b[l].as_mut_ptr(),
                s.d1[l - 1].as_ptr(),
                s.d[l - 1].as_mut_ptr(),
            );
            matmul_epi::<HV, _>(s.d[l].as_ptr(), h, h, &net.v[l - 1], P, |_, i, v| {
                if TRAIN {
                    _mm512_storeu_ps(bp.add(i), v);
                }
                _mm512_storeu_ps(dp.add(i), _mm512_mul_ps(v, _mm512_loadu_ps(d1p.add(i))));
            });
        }
    }

    /// `(V_0^T d_0)[:2]` of the block's point `t`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn score_dot<const HV: usize>(net: &ToyMlp, s: &TrainScratch, t: usize) -> (f32, f32) {
        let h = 16 * HV;
        let (c0, c1) = (net.v0c[..h].as_ptr(), net.v0c[h..].as_ptr());
        let dp = s.d[0].as_ptr().add(t * h);
        let (mut v0, mut v1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for q in 0..HV {
            let dv = _mm512_loadu_ps(dp.add(16 * q));
            v0 = _mm512_fmadd_ps(dv, _mm512_loadu_ps(c0.add(16 * q)), v0);
            v1 = _mm512_fmadd_ps(dv, _mm512_loadu_ps(c1.add(16 * q)), v1);
        }
        (_mm512_reduce_add_ps(v0), _mm512_reduce_add_ps(v1))
    }

    /// The score of one block's points (`x` [m, 2], `sigma` [m], m <= P) into `out` [m, 2].
    ///
    /// # Safety
    /// The CPU must support AVX-512F, and `net.hidden` must be `16 HV`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn score_block<const HV: usize>(
        net: &ToyMlp,
        x: &[f32],
        sigma: &[f32],
        out: &mut [f32],
        s: &mut TrainScratch,
    ) {
        block_inputs::<HV>(net, x, sigma, s);
        forward_score::<HV, false>(net, s);
        // score = c_in (V_0^T d_0)[:2] - x c_in^2.
        for t in 0..sigma.len() {
            let (z0, z1) = score_dot::<HV>(net, s, t);
            let c = s.c_in[t];
            out[2 * t] = c * z0 - x[2 * t] * c * c;
            out[2 * t + 1] = c * z1 - x[2 * t + 1] * c * c;
        }
    }

    /// Adds one block's share (points `x` [m, 2], `sigma` [m], `target` [m, 2], m <= P; the
    /// batch has `n` points) of the loss and its gradients to `sums` (see `ToyStack._block`).
    ///
    /// # Safety
    /// The CPU must support AVX-512F, and `net.hidden` must be `16 HV`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn train_block<const HV: usize>(
        net: &ToyMlp,
        x: &[f32],
        sigma: &[f32],
        target: &[f32],
        n: usize,
        sums: &mut TrainSums,
        s: &mut TrainScratch,
    ) {
        let h = 16 * HV;
        let layers = net.vt.len();
        let m = sigma.len();
        let inv_n = 1.0 / n as f32;
        // Padding points (x = 0, sigma = 1) get s_bar = 0, so they add nothing.
        block_inputs::<HV>(net, x, sigma, s);
        forward_score::<HV, true>(net, s);
        let kp = s.k.as_ptr();
        // score = c_in (V_0^T d_0)[:2] - x c_in^2; loss sigma^2 mean_j diff^2 / n, s_bar.
        let mut loss = 0.0f64;
        for t in 0..P {
            let (z0, z1) = score_dot::<HV>(net, s, t);
            if t >= m {
                s.s_bar[2 * t] = 0.0;
                s.s_bar[2 * t + 1] = 0.0;
                continue;
            }
            let c = s.c_in[t];
            let s2 = sigma[t] * sigma[t];
            let diff = [
                c * z0 - x[2 * t] * c * c - target[2 * t],
                c * z1 - x[2 * t + 1] * c * c - target[2 * t + 1],
            ];
            loss += f64::from(s2 * (diff[0] * diff[0] + diff[1] * diff[1]) * 0.5 * inv_n);
            s.s_bar[2 * t] = c * s2 * diff[0] * inv_n;
            s.s_bar[2 * t + 1] = c * s2 * diff[1] * inv_n;
        }
        sums.loss += loss;
        // Adjoint of the score pass: G_0[:, :2] += d_0^T s_bar, d_bar = s_bar V_0[:, :2]^T; per
        // layer, b_bar = d_bar silu', h_bar_{l-1} = d_bar b_l silu'' (where d_bar is made);
        // G_l += d_l^T b_bar, d_bar = b_bar V_l^T.
        matmul::<HV, true, true>(&s.s_bar, 2, P, &s.d[0], &mut sums.g0t, 2);
        let adjoint = |l: usize, s: &mut TrainScratch| {
            let (bbp, hbp) = (s.b_bar.as_mut_ptr(), s.h_bar[l - 1].as_mut_ptr());
            let (d1p, bp, d2p) = (s.d1[l - 1].as_ptr(), s.b[l].as_ptr(), s.d2[l - 1].as_ptr());
            move |_: usize, i: usize, db: __m512| {
                _mm512_storeu_ps(bbp.add(i), _mm512_mul_ps(db, _mm512_loadu_ps(d1p.add(i))));
                let hb = _mm512_mul_ps(
                    _mm512_mul_ps(db, _mm512_loadu_ps(bp.add(i))),
                    _mm512_loadu_ps(d2p.add(i)),
                );
                _mm512_storeu_ps(hbp.add(i), hb);
            }
        };
        let first = adjoint(1, s);
        let (c0, c1) = (net.v0c[..h].as_ptr(), net.v0c[h..].as_ptr());
        for t in 0..P {
            let (s0, s1) = (
                _mm512_set1_ps(s.s_bar[2 * t]),
                _mm512_set1_ps(s.s_bar[2 * t + 1]),
            );
            for q in 0..HV {
                let v = _mm512_fmadd_ps(
                    s1,
                    _mm512_loadu_ps(c1.add(16 * q)),
                    _mm512_mul_ps(s0, _mm512_loadu_ps(c0.add(16 * q))),
                );
                first(t, t * h + 16 * q, v);
            }
        }
        for l in 1..=layers {
            matmul::<HV, true, true>(&s.d[l], h, P, &s.b_bar, &mut sums.g[l - 1], h);
            // b_bar's rows are read before the epilogue overwrites them (gemm_epi).
            let bb = s.b_bar.as_mut_ptr();
            if l < layers {
                matmul_epi::<HV, _>(bb, h, h, &net.vt[l - 1], P, adjoint(l + 1, s));
            } else {
                // The last d_bar, and h_bar_L = k d_bar for the forward pass's adjoint.
                let (dbp, hbp) = (s.d_bar.as_mut_ptr(), s.h_bar[layers].as_mut_ptr());
                matmul_epi::<HV, _>(bb, h, h, &net.vt[l - 1], P, |r, i, v| {
                    _mm512_storeu_ps(dbp.add(i), v);
                    _mm512_storeu_ps(hbp.add(i), _mm512_mul_ps(v, _mm512_set1_ps(*kp.add(r))));
                });
            }
        }
        // The gain's gradient: sum (2 / H) / sigma h_L . d_bar.
        let mut gain = 0.0f64;
        for (t, &sg) in sigma.iter().enumerate() {
            let (hp, dp) = (s.h.as_ptr().add(t * h), s.d_bar.as_ptr().add(t * h));
            let mut acc = _mm512_setzero_ps();
            for q in 0..HV {
                acc = _mm512_fmadd_ps(
                    _mm512_loadu_ps(hp.add(16 * q)),
                    _mm512_loadu_ps(dp.add(16 * q)),
                    acc,
                );
            }
            let dot = _mm512_reduce_add_ps(acc);
            gain += f64::from((2.0 / h as f32) / sg * dot);
        }
        sums.gain += gain;
        // Adjoint of the forward pass: G_l += h_bar_l^T a_l; h_bar_{l-1} += (h_bar_l V_l)
        // silu'(h_{l-1}) (in the epilogue); G_0 += h_bar_0^T u.
        for l in (1..=layers).rev() {
            matmul::<HV, true, true>(&s.h_bar[l], h, P, &s.a[l - 1], &mut sums.g[l - 1], h);
            let (d1p, hbp) = (s.d1[l - 1].as_ptr(), s.h_bar[l - 1].as_mut_ptr());
            matmul_epi::<HV, _>(s.h_bar[l].as_ptr(), h, h, &net.v[l - 1], P, |_, i, v| {
                let hb =
                    _mm512_fmadd_ps(v, _mm512_loadu_ps(d1p.add(i)), _mm512_loadu_ps(hbp.add(i)));
                _mm512_storeu_ps(hbp.add(i), hb);
            });
        }
        matmul::<HV, true, true>(&s.u, INPUTS, P, &s.h_bar[0], &mut sums.g0t, INPUTS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random stream in [-0.5, 0.5).
    fn uniform(state: &mut u64) -> f64 {
        crate::simd::uniform(state) - 0.5
    }

    /// Applied weights `(v0, layers)` of `layers` hidden layers, uniform in [-0.5, 0.5) (first
    /// layer) and [-0.25, 0.25).
    fn random_weights(hidden: usize, layers: usize, st: &mut u64) -> (Vec<f32>, Vec<Vec<f32>>) {
        let layers = (0..layers)
            .map(|_| {
                (0..hidden * hidden)
                    .map(|_| (uniform(st) * 0.5) as f32)
                    .collect()
            })
            .collect();
        let v0 = (0..hidden * INPUTS).map(|_| uniform(st) as f32).collect();
        (v0, layers)
    }

    /// A training batch `(x, sigma, target)` of `n` points: x in [-1.5, 1.5), targets in [-5, 5),
    /// sigma log-uniform over [e^-4, e^2).
    fn random_batch(n: usize, st: &mut u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let x = (0..2 * n).map(|_| (uniform(st) * 3.0) as f32).collect();
        let target = (0..2 * n).map(|_| (uniform(st) * 10.0) as f32).collect();
        let sigma = (0..n)
            .map(|_| (-4.0 + 6.0 * (uniform(st) + 0.5)).exp() as f32)
            .collect();
        (x, sigma, target)
    }

    /// The score in float64 by the formulas of the module docs, and the scale of its two terms
    /// (`|c_in V_0^T d_0|` + `|x c_in^2|`) against which float32 rounding is measured.
    fn reference(
        v0: &[f32],
        layers: &[Vec<f32>],
        gain: f64,
        sd: f64,
        x: [f64; 2],
        sigma: f64,
    ) -> ([f64; 2], f64) {
        let h = v0.len() / INPUTS;
        let c_in = 1.0 / (sd * sd + sigma * sigma).sqrt();
        let u = [x[0] * c_in, x[1] * c_in, sigma.ln() / 4.0, 1.0];
        let mut hv: Vec<f64> = (0..h)
            .map(|o| {
                (0..INPUTS)
                    .map(|i| f64::from(v0[o * INPUTS + i]) * u[i])
                    .sum()
            })
            .collect();
        let mut d1s = vec![];
        for w in layers {
            let sig: Vec<f64> = hv.iter().map(|&z| 1.0 / (1.0 + (-z).exp())).collect();
            let a: Vec<f64> = hv.iter().zip(&sig).map(|(z, s)| z * s).collect();
            d1s.push(
                hv.iter()
                    .zip(&sig)
                    .map(|(z, s)| s * (1.0 + z * (1.0 - s)))
                    .collect::<Vec<f64>>(),
            );
            hv = (0..h)
                .map(|o| (0..h).map(|i| f64::from(w[o * h + i]) * a[i]).sum())
                .collect();
        }
        let k = 2.0 * gain / (sigma * h as f64);
        let mut d: Vec<f64> = hv.iter().map(|z| k * z).collect();
        for (w, d1) in layers.iter().zip(&d1s).rev() {
            d = (0..h)
                .map(|i| (0..h).map(|o| d[o] * f64::from(w[o * h + i])).sum::<f64>() * d1[i])
                .collect();
        }
        let mut out = [0.0; 2];
        let mut scale = 0.0f64;
        for j in 0..2 {
            let first = c_in
                * (0..h)
                    .map(|o| d[o] * f64::from(v0[o * INPUTS + j]))
                    .sum::<f64>();
            out[j] = first - x[j] * c_in * c_in;
            scale = scale.max(first.abs() + (x[j] * c_in * c_in).abs());
        }
        (out, scale)
    }

    #[test]
    fn score_matches_float64() {
        for hidden in [16, 32, 64] {
            if !ToyMlp::available(hidden) {
                continue; // no AVX-512 here: the torch path serves (tested in Python)
            }
            let mut st = hidden as u64;
            let (v0, layers) = random_weights(hidden, 4, &mut st);
            let (gain, sd) = (0.8f32, 0.5f32);
            let net = ToyMlp::new(sd, gain, &v0, &layers).unwrap();
            // 1,001 points (not a multiple of the tile or the chunk), noise from 1e-3 to 20.
            let n = 1001;
            let x: Vec<f32> = (0..2 * n)
                .map(|_| (uniform(&mut st) * 6.0) as f32)
                .collect();
            let sigma: Vec<f32> = (0..n)
                .map(|_| (-7.0 + 20.0 * (uniform(&mut st) + 0.5)).exp().min(20.0) as f32)
                .collect();
            let got = net.score(&x, &sigma).unwrap();
            for p in 0..n {
                let xp = [f64::from(x[2 * p]), f64::from(x[2 * p + 1])];
                let (want, scale) = reference(
                    &v0,
                    &layers,
                    f64::from(gain),
                    f64::from(sd),
                    xp,
                    f64::from(sigma[p]),
                );
                for j in 0..2 {
                    // float32 rounding through five layers of 16-64-term sums: well under 1e-5
                    // of the terms' scale.
                    let err = (f64::from(got[2 * p + j]) - want[j]).abs();
                    assert!(
                        err <= 1e-5 * scale,
                        "H {hidden} point {p}: {} vs {} (scale {scale})",
                        got[2 * p + j],
                        want[j]
                    );
                }
            }
        }
    }

    #[test]
    fn train_gradients_add_over_points_and_repeat_exactly() {
        // A batch of 1,001 points (blocks and tasks with padding) against its two parts of 500
        // and 501 points: the loss and every gradient are means over points, so the whole equals
        // the parts weighted by their sizes (to float32 rounding of the sums); a second call
        // gives the same bits (the tasks' sums are added in a fixed order).
        let hidden = 32;
        if !ToyMlp::available(hidden) {
            return;
        }
        let mut st = 3u64;
        let (v0, layers) = random_weights(hidden, 3, &mut st);
        let net = ToyMlp::new(0.5, 1.3, &v0, &layers).unwrap();
        let n = 1001;
        let (x, sigma, target) = random_batch(n, &mut st);
        let whole = net.train_gradients(&x, &sigma, &target).unwrap();
        let again = net.train_gradients(&x, &sigma, &target).unwrap();
        assert_eq!(whole.loss.to_bits(), again.loss.to_bits());
        assert_eq!(whole.layers, again.layers);
        let cut = 500;
        let a = net
            .train_gradients(&x[..2 * cut], &sigma[..cut], &target[..2 * cut])
            .unwrap();
        let b = net
            .train_gradients(&x[2 * cut..], &sigma[cut..], &target[2 * cut..])
            .unwrap();
        let (wa, wb) = (cut as f64 / n as f64, (n - cut) as f64 / n as f64);
        let close = |w: f64, pa: f64, pb: f64, what: &str| {
            let want = wa * pa + wb * pb;
            assert!(
                (w - want).abs() <= 1e-5 * (wa * pa.abs() + wb * pb.abs()),
                "{what}: {w} vs {want}"
            );
        };
        close(whole.loss, a.loss, b.loss, "loss");
        close(whole.gain, a.gain, b.gain, "gain");
        for (l, ((w, pa), pb)) in whole
            .layers
            .iter()
            .zip(&a.layers)
            .zip(&b.layers)
            .enumerate()
        {
            let scale: f64 = w.iter().map(|v| f64::from(*v).abs()).sum::<f64>() / w.len() as f64;
            for ((w, pa), pb) in w.iter().zip(pa).zip(pb) {
                let want = wa * f64::from(*pa) + wb * f64::from(*pb);
                assert!(
                    (f64::from(*w) - want).abs() <= 1e-4 * scale,
                    "layer {l}: {w} vs {want}"
                );
            }
        }
        assert!(net.train_gradients(&x, &sigma, &target[..4]).is_err());
    }

    #[test]
    fn train_many_equals_each_models_own_call() {
        // Three models (two of 1,001 points, one of 97) in one job: each result equals, bit for
        // bit, the model's own call; a model of another shape is refused.
        let hidden = 16;
        if !ToyMlp::available(hidden) {
            return;
        }
        let mut st = 11u64;
        let nets: Vec<ToyMlp> = (0..3)
            .map(|i| {
                let (v0, layers) = random_weights(hidden, 2, &mut st);
                ToyMlp::new(0.5, 0.7 + i as f32, &v0, &layers).unwrap()
            })
            .collect();
        let data: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = [1001, 97, 1001]
            .iter()
            .map(|&n| random_batch(n, &mut st))
            .collect();
        let batches: Vec<TrainBatch> = nets
            .iter()
            .zip(&data)
            .map(|(net, (x, sigma, target))| TrainBatch {
                net,
                x,
                sigma,
                target,
            })
            .collect();
        let many = ToyMlp::train_many(&batches).unwrap();
        for (got, b) in many.iter().zip(&batches) {
            let own = b.net.train_gradients(b.x, b.sigma, b.target).unwrap();
            assert_eq!(got.loss.to_bits(), own.loss.to_bits());
            assert_eq!(got.gain.to_bits(), own.gain.to_bits());
            assert_eq!((&got.v0, &got.layers), (&own.v0, &own.layers));
        }
        let (v0, layers) = random_weights(hidden, 3, &mut st);
        let deeper = ToyMlp::new(0.5, 1.0, &v0, &layers).unwrap();
        let odd = TrainBatch {
            net: &deeper,
            ..batches[0]
        };
        let err = ToyMlp::train_many(&[batches[0], odd]).unwrap_err();
        assert!(err.to_string().contains("of one shape"), "{err}");
    }

    #[test]
    fn rejects_bad_input() {
        let v0 = vec![0.1f32; 32 * INPUTS];
        let layers = vec![vec![0.01f32; 32 * 32]; 2];
        assert!(ToyMlp::new(0.0, 1.0, &v0, &layers).is_err());
        assert!(ToyMlp::new(0.5, 1.0, &v0[..24 * INPUTS], &layers).is_err()); // 24 features
        assert!(ToyMlp::new(0.5, 1.0, &v0, &[vec![0.0; 10]]).is_err());
        if ToyMlp::available(32) {
            let net = ToyMlp::new(0.5, 1.0, &v0, &layers).unwrap();
            assert!(net.score(&[0.0, 0.0], &[0.0]).is_err());
            assert!(net.score(&[0.0], &[1.0]).is_err());
            assert!(net.score(&[f32::NAN, 0.0], &[1.0]).is_err());
            assert_eq!(net.score(&[], &[]).unwrap().len(), 0);
        }
    }
}
