//! `autoguide_fast._core`: thin PyO3 layer over `autoguide-core` (type and error conversion only).

use std::collections::BTreeMap;

use autoguide_core::{idle, mixture, phema, posthoc, schedule, store, toy_mlp, Error};
use pyo3::exceptions::{
    PyException, PyFileNotFoundError, PyOSError, PyOverflowError, PyRuntimeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

pyo3::create_exception!(
    _core,
    AutoguideError,
    PyException,
    "Base class of autoguide_fast errors that are not plain ValueErrors."
);

fn to_py(err: Error) -> PyErr {
    match err {
        Error::InvalidParameter { .. } | Error::ShapeMismatch { .. } => {
            PyValueError::new_err(err.to_string())
        }
        Error::NotFound { .. } => PyFileNotFoundError::new_err(err.to_string()),
        Error::Io { .. } => PyOSError::new_err(err.to_string()),
        Error::NoConvergence { .. }
        | Error::Format { .. }
        | Error::Inconsistent { .. }
        | Error::NonFinite { .. }
        | Error::Cancelled
        | Error::Background(_) => AutoguideError::new_err(err.to_string()),
    }
}

/// A Python int as a step count; negative ones and ones beyond 64 bits get the core's
/// `ValueError` for a step count out of range (the core checks the upper bound).
fn steps_arg(steps: &Bound<'_, PyAny>) -> PyResult<usize> {
    let out_of_range = || {
        to_py(Error::InvalidParameter {
            name: "steps",
            value: steps.to_string(),
            requirement: schedule::STEPS_REQUIREMENT,
        })
    };
    match steps.extract::<i64>() {
        Ok(n) => usize::try_from(n).map_err(|_| out_of_range()),
        Err(e) if e.is_instance_of::<PyOverflowError>(steps.py()) => Err(out_of_range()),
        Err(e) => Err(e),
    }
}

/// One sampler step of the plan (see `autoguide_core::schedule::Step`).
#[pyclass(frozen, get_all, module = "autoguide_fast._core")]
#[derive(Clone)]
struct Step {
    index: usize,
    t_cur: f64,
    t_hat: f64,
    t_next: f64,
    gamma: f64,
    second_order: bool,
    guided: bool,
    guided_next: bool,
}

#[pymethods]
impl Step {
    fn __repr__(&self) -> String {
        format!(
            "Step(index={}, t_cur={}, t_hat={}, t_next={}, gamma={}, second_order={}, guided={}, guided_next={})",
            self.index, self.t_cur, self.t_hat, self.t_next, self.gamma,
            py_bool(self.second_order), py_bool(self.guided), py_bool(self.guided_next)
        )
    }
}

fn py_bool(b: bool) -> &'static str {
    if b {
        "True"
    } else {
        "False"
    }
}

impl From<schedule::Step> for Step {
    fn from(s: schedule::Step) -> Self {
        Step {
            index: s.index,
            t_cur: s.t_cur,
            t_hat: s.t_hat,
            t_next: s.t_next,
            gamma: s.gamma,
            second_order: s.second_order,
            guided: s.guided,
            guided_next: s.guided_next,
        }
    }
}

/// EDM noise levels, length steps + 1, the last one 0.
#[pyfunction]
fn edm_sigmas(
    steps: &Bound<'_, PyAny>,
    sigma_min: f64,
    sigma_max: f64,
    rho: f64,
) -> PyResult<Vec<f64>> {
    let s = schedule::Schedule {
        steps: steps_arg(steps)?,
        sigma_min,
        sigma_max,
        rho,
    };
    s.sigmas().map_err(to_py)
}

/// The per-step plan of the EDM Heun sampler with churn and a guidance interval.
#[pyfunction]
#[pyo3(signature = (steps, sigma_min, sigma_max, rho, churn=0.0, churn_min=0.0, churn_max=f64::INFINITY, interval_lo=0.0, interval_hi=f64::INFINITY))]
#[allow(clippy::too_many_arguments)]
fn step_plan(
    steps: &Bound<'_, PyAny>,
    sigma_min: f64,
    sigma_max: f64,
    rho: f64,
    churn: f64,
    churn_min: f64,
    churn_max: f64,
    interval_lo: f64,
    interval_hi: f64,
) -> PyResult<Vec<Step>> {
    let s = schedule::Schedule {
        steps: steps_arg(steps)?,
        sigma_min,
        sigma_max,
        rho,
    };
    let churn = schedule::Churn {
        amount: churn,
        min: churn_min,
        max: churn_max,
    };
    let interval = schedule::Interval {
        lo: interval_lo,
        hi: interval_hi,
    };
    Ok(s.plan(churn, interval)
        .map_err(to_py)?
        .into_iter()
        .map(Step::from)
        .collect())
}

/// Power-function EMA exponent of relative std `std`.
#[pyfunction]
fn std_to_exp(std: f64) -> PyResult<f64> {
    phema::std_to_exp(std).map_err(to_py)
}

/// Relative std of the power-function EMA profile with exponent `exp`.
#[pyfunction]
fn exp_to_std(exp: f64) -> PyResult<f64> {
    phema::exp_to_std(exp).map_err(to_py)
}

/// Per-update EMA decay tracking relative std `std`.
#[pyfunction]
fn power_function_beta(std: f64, t_next: f64, t_delta: f64) -> PyResult<f64> {
    phema::power_function_beta(std, t_next, t_delta).map_err(to_py)
}

fn f64s(name: &str, bytes: &[u8]) -> PyResult<Vec<f64>> {
    if !bytes.len().is_multiple_of(8) {
        return Err(PyValueError::new_err(format!(
            "{name} must hold float64 values, got {} bytes",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|c| f64::from_ne_bytes(c.try_into().expect("chunk of 8")))
        .collect())
}

/// float32 values as native-endian bytes.
fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|f| f.to_ne_bytes()).collect()
}

fn f32s(name: &str, bytes: &[u8]) -> PyResult<Vec<f32>> {
    if !bytes.len().is_multiple_of(4) {
        return Err(PyValueError::new_err(format!(
            "{name} must hold float32 values, got {} bytes",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_ne_bytes(c.try_into().expect("chunk of 4")))
        .collect())
}

/// 2D Gaussian mixture with exact log-density and score under heat diffusion.
#[pyclass(frozen, module = "autoguide_fast._core")]
struct Mixture2D {
    inner: mixture::Mixture2D,
    inner_f32: std::sync::Arc<mixture::Mixture2DF32>,
}

/// A float32 score started by `Mixture2D.score_f32_start`, computing on the idle pool.
#[pyclass(frozen, module = "autoguide_fast._core")]
struct PendingScore {
    job: std::sync::Mutex<Option<idle::Pending<autoguide_core::Result<Vec<f32>>>>>,
}

#[pymethods]
impl PendingScore {
    /// Waits for the score and returns it as `Mixture2D.score_f32` does (once).
    fn result<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let job = self
            .job
            .lock()
            .map_err(|_| PyRuntimeError::new_err("PendingScore: lock poisoned"))?
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("PendingScore.result() was already taken"))?;
        let score = py.detach(|| job.wait()).map_err(to_py)?.map_err(to_py)?;
        Ok(PyBytes::new(py, &f32_bytes(&score)))
    }
}

#[pymethods]
impl Mixture2D {
    #[new]
    fn new(phi: Vec<f64>, mu: Vec<f64>, cov: Vec<f64>) -> PyResult<Self> {
        let inner = mixture::Mixture2D::new(&phi, &mu, &cov).map_err(to_py)?;
        let inner_f32 = std::sync::Arc::new(mixture::Mixture2DF32::new(&inner));
        Ok(Self { inner, inner_f32 })
    }

    /// x: float32 bytes [N, 2]; sigma: float32 bytes [N]. Returns the score, float32 [N, 2], as
    /// native-endian bytes (float32 arithmetic: relative error about 1e-6).
    fn score_f32<'py>(
        &self,
        py: Python<'py>,
        x: &[u8],
        sigma: &[u8],
    ) -> PyResult<Bound<'py, PyBytes>> {
        let x = f32s("x", x)?;
        let sigma = f32s("sigma", sigma)?;
        let score = py
            .detach(|| self.inner_f32.score(&x, &sigma))
            .map_err(to_py)?;
        Ok(PyBytes::new(py, &f32_bytes(&score)))
    }

    /// `score_f32` started on the core's idle pool (lowest-priority threads that use the cores
    /// the caller leaves idle): checks the inputs and returns at once; `.result()` waits for the
    /// bytes.
    fn score_f32_start(&self, x: &[u8], sigma: &[u8]) -> PyResult<PendingScore> {
        let (x, sigma) = (f32s("x", x)?, f32s("sigma", sigma)?);
        mixture::Mixture2DF32::check(&x, &sigma).map_err(to_py)?; // bad input raises here
        let m = std::sync::Arc::clone(&self.inner_f32);
        let job = idle::spawn(move || m.score(&x, &sigma));
        Ok(PendingScore {
            job: std::sync::Mutex::new(Some(job)),
        })
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    /// x: float64 bytes [N, 2]; sigma: float64 bytes [N]. Returns (logp f64 [N], score f64
    /// [N, 2], argmax u32 [N]) as native-endian bytes.
    fn eval<'py>(
        &self,
        py: Python<'py>,
        x: &[u8],
        sigma: &[u8],
    ) -> PyResult<(
        Bound<'py, PyBytes>,
        Bound<'py, PyBytes>,
        Bound<'py, PyBytes>,
    )> {
        let x = f64s("x", x)?;
        let sigma = f64s("sigma", sigma)?;
        let e = py.detach(|| self.inner.eval(&x, &sigma)).map_err(to_py)?;
        let bytes = |v: &[f64]| v.iter().flat_map(|f| f.to_ne_bytes()).collect::<Vec<u8>>();
        let am: Vec<u8> = e.argmax.iter().flat_map(|i| i.to_ne_bytes()).collect();
        Ok((
            PyBytes::new(py, &bytes(&e.logp)),
            PyBytes::new(py, &bytes(&e.score)),
            PyBytes::new(py, &am),
        ))
    }
}

/// Hidden layers' weights from float32 bytes.
fn layer_f32s(layers: &[Vec<u8>]) -> PyResult<Vec<Vec<f32>>> {
    layers.iter().map(|w| f32s("layers", w)).collect()
}

/// A toy MLP from its applied weights as float32 bytes (`v0` [H, 4], `layers` each [H, H]).
fn toy_net(
    v0: &[u8],
    layers: Vec<Vec<u8>>,
    gain: f32,
    sigma_data: f32,
) -> PyResult<toy_mlp::ToyMlp> {
    toy_mlp::ToyMlp::new(sigma_data, gain, &f32s("v0", v0)?, &layer_f32s(&layers)?).map_err(to_py)
}

/// Whether `toy_mlp_score` runs on this CPU for `hidden` features.
#[pyfunction]
fn toy_mlp_available(hidden: usize) -> bool {
    toy_mlp::ToyMlp::available(hidden)
}

/// The score of a toy MLP (float32 bytes): `x` [N, 2], `sigma` [N], the applied weights `v0`
/// [H, 4] and `layers` (each [H, H]), `gain` and `sigma_data`. Returns float32 bytes [N, 2].
#[pyfunction]
fn toy_mlp_score<'py>(
    py: Python<'py>,
    x: &[u8],
    sigma: &[u8],
    v0: &[u8],
    layers: Vec<Vec<u8>>,
    gain: f32,
    sigma_data: f32,
) -> PyResult<Bound<'py, PyBytes>> {
    let (x, sigma) = (f32s("x", x)?, f32s("sigma", sigma)?);
    let net = toy_net(v0, layers, gain, sigma_data)?;
    let score = py.detach(|| net.score(&x, &sigma)).map_err(to_py)?;
    Ok(PyBytes::new(py, &f32_bytes(&score)))
}

/// The exact-score-matching loss of `S` toy MLPs of one shape, each on its own batch, and its
/// gradients in the applied weights, as one parallel job (float32 bytes of the stacked arrays:
/// `x`, `target` [S, N, 2], `sigma` [S, N], `v0` [S, H, 4], `layers` each [S, H, H]; `gains`
/// [S]): `([loss], [d loss / d gain], d loss / d v0 bytes [S, H, 4], [d loss / d layer bytes
/// [S, H, H]])`.
#[pyfunction]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn toy_mlp_train_stack<'py>(
    py: Python<'py>,
    x: &[u8],
    sigma: &[u8],
    target: &[u8],
    v0: &[u8],
    layers: Vec<Vec<u8>>,
    gains: Vec<f32>,
    sigma_data: f32,
) -> PyResult<(
    Vec<f64>,
    Vec<f64>,
    Bound<'py, PyBytes>,
    Vec<Bound<'py, PyBytes>>,
)> {
    let (x, sigma, target, v0) = (
        f32s("x", x)?,
        f32s("sigma", sigma)?,
        f32s("target", target)?,
        f32s("v0", v0)?,
    );
    let layers = layer_f32s(&layers)?;
    let models = gains.len();
    let stacked = |name: &str, v: &[f32]| {
        if models == 0 || !v.len().is_multiple_of(models) {
            return Err(PyValueError::new_err(format!(
                "{name} must stack {models} models (a multiple of {models} values), got {} values",
                v.len()
            )));
        }
        Ok(v.len() / models)
    };
    let (n, per_v0) = (stacked("sigma", &sigma)?, stacked("v0", &v0)?);
    let per_layer = layers
        .iter()
        .map(|w| stacked("layers", w))
        .collect::<PyResult<Vec<_>>>()?;
    let nets = (0..models)
        .map(|m| {
            let ws: Vec<Vec<f32>> = layers
                .iter()
                .zip(&per_layer)
                .map(|(w, &k)| w[m * k..(m + 1) * k].to_vec())
                .collect();
            toy_mlp::ToyMlp::new(sigma_data, gains[m], &v0[m * per_v0..(m + 1) * per_v0], &ws)
                .map_err(to_py)
        })
        .collect::<PyResult<Vec<_>>>()?;
    for (name, v) in [("x", &x), ("target", &target)] {
        if v.len() != 2 * models * n {
            return Err(PyValueError::new_err(format!(
                "{name} must hold {models} x {n} x 2 values (as sigma: {models} x {n}), got {}",
                v.len()
            )));
        }
    }
    let batches: Vec<toy_mlp::TrainBatch> = nets
        .iter()
        .enumerate()
        .map(|(m, net)| toy_mlp::TrainBatch {
            net,
            x: &x[2 * m * n..2 * (m + 1) * n],
            sigma: &sigma[m * n..(m + 1) * n],
            target: &target[2 * m * n..2 * (m + 1) * n],
        })
        .collect();
    let grads = py
        .detach(|| toy_mlp::ToyMlp::train_many(&batches))
        .map_err(to_py)?;
    let v0_grads: Vec<f32> = grads.iter().flat_map(|g| g.v0.iter().copied()).collect();
    let layer_grads = (0..layers.len())
        .map(|l| {
            let w: Vec<f32> = grads
                .iter()
                .flat_map(|g| g.layers[l].iter().copied())
                .collect();
            PyBytes::new(py, &f32_bytes(&w))
        })
        .collect();
    Ok((
        grads.iter().map(|g| g.loss).collect(),
        grads.iter().map(|g| g.gain).collect(),
        PyBytes::new(py, &f32_bytes(&v0_grads)),
        layer_grads,
    ))
}

/// (name, dtype, shape, begin, end): one tensor of a snapshot header, byte range absolute.
type TensorRow = (String, String, Vec<usize>, usize, usize);

/// Validates the safetensors file at `path` (memory-mapped) and returns its string metadata
/// and its tensors in file order.
#[pyfunction]
fn read_header(
    py: Python<'_>,
    path: std::path::PathBuf,
) -> PyResult<(BTreeMap<String, String>, Vec<TensorRow>)> {
    let header = py
        .detach(|| store::MappedSnapshot::open(&path).map(|s| s.header().clone()))
        .map_err(to_py)?;
    let rows = header
        .tensors
        .into_iter()
        .map(|t| (t.name, t.dtype.to_string(), t.shape, t.begin, t.end))
        .collect();
    Ok((header.metadata, rows))
}

/// Writes tensors given as (name, dtype, shape, address, nbytes) of live, contiguous CPU
/// buffers, atomically. Internal: `autoguide_fast.checkpoint.save` is the public entry point and
/// keeps the tensors alive for the duration of the call.
#[pyfunction]
fn write_snapshot(
    py: Python<'_>,
    path: std::path::PathBuf,
    tensors: Vec<(String, String, Vec<usize>, usize, usize)>,
    metadata: BTreeMap<String, String>,
) -> PyResult<()> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, dtype, shape, addr, nbytes) in tensors {
        let data: &[u8] = if nbytes == 0 {
            &[]
        } else {
            // SAFETY: the caller (checkpoint.save) passes the address and byte size of
            // contiguous CPU tensors that it keeps referenced until this call returns, and
            // nothing writes to them meanwhile; the bytes are only read.
            unsafe { std::slice::from_raw_parts(addr as *const u8, nbytes) }
        };
        views.push(store::TensorData {
            name,
            dtype: store::parse_dtype(&dtype).map_err(to_py)?,
            shape,
            data,
        });
    }
    py.detach(|| store::write_atomic(&path, &views, &metadata))
        .map_err(to_py)
}

/// Post-hoc EMA coefficients, `[in][out]`, each column summing to 1.
#[pyfunction]
fn solve_coefficients(
    in_nimg: Vec<f64>,
    in_std: Vec<f64>,
    out_nimg: Vec<f64>,
    out_std: Vec<f64>,
) -> PyResult<Vec<Vec<f64>>> {
    let m = out_nimg.len();
    let x = posthoc::solve_coefficients(&in_nimg, &in_std, &out_nimg, &out_std).map_err(to_py)?;
    Ok(x.chunks(m.max(1)).map(|row| row.to_vec()).collect())
}

/// Streams once over `inputs` and writes every output (path, metadata) as
/// `sum_i coefs[i][j] * inputs[i]`, each tensor in `dtype` ("F32", "F16", "BF16"; None: the
/// dtype of its inputs, float32 where they differ); tensors named in `copy` come from the last
/// input. `progress(done, total)` reports work items; an exception raised there, or a signal
/// such as Ctrl-C, stops the work before any output is renamed into place.
#[pyfunction]
#[pyo3(signature = (inputs, coefs, outputs, copy, progress=None, dtype=None))]
fn reconstruct(
    py: Python<'_>,
    inputs: Vec<std::path::PathBuf>,
    coefs: Vec<Vec<f64>>,
    outputs: Vec<(std::path::PathBuf, BTreeMap<String, String>)>,
    copy: Vec<String>,
    progress: Option<Py<PyAny>>,
    dtype: Option<String>,
) -> PyResult<()> {
    let dtype = dtype
        .map(|d| store::parse_dtype(&d))
        .transpose()
        .map_err(to_py)?;
    let m = outputs.len();
    if coefs.len() != inputs.len() || coefs.iter().any(|r| r.len() != m) {
        return Err(PyValueError::new_err(format!(
            "coefs must be [inputs][outputs] = [{}][{m}]",
            inputs.len()
        )));
    }
    let flat: Vec<f64> = coefs.into_iter().flatten().collect();
    let outputs: Vec<posthoc::Output> = outputs
        .into_iter()
        .map(|(path, metadata)| posthoc::Output { path, metadata })
        .collect();
    let copy = copy.into_iter().collect();
    let mut failure: Option<PyErr> = None;
    let result = py.detach(|| {
        posthoc::reconstruct(&inputs, &flat, &outputs, &copy, dtype, |done, total| {
            // Between batches: a pending Ctrl-C (or any signal handler's exception) and an
            // exception from the callback both stop the work; no output is left behind.
            Python::attach(|py| {
                py.check_signals()?;
                match &progress {
                    Some(cb) => cb.call1(py, (done, total)).map(|_| ()),
                    None => Ok(()),
                }
            })
            .map_err(|e| {
                failure = Some(e);
                Error::Cancelled
            })
        })
    });
    match (result, failure) {
        (_, Some(e)) => Err(e),
        (r, None) => r.map_err(to_py),
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("AutoguideError", m.py().get_type::<AutoguideError>())?;
    m.add("STD_MAX", phema::std_max())?;
    m.add_class::<Step>()?;
    m.add_class::<Mixture2D>()?;
    m.add_class::<PendingScore>()?;
    m.add_function(wrap_pyfunction!(edm_sigmas, m)?)?;
    m.add_function(wrap_pyfunction!(step_plan, m)?)?;
    m.add_function(wrap_pyfunction!(std_to_exp, m)?)?;
    m.add_function(wrap_pyfunction!(exp_to_std, m)?)?;
    m.add_function(wrap_pyfunction!(power_function_beta, m)?)?;
    m.add_function(wrap_pyfunction!(read_header, m)?)?;
    m.add_function(wrap_pyfunction!(solve_coefficients, m)?)?;
    m.add_function(wrap_pyfunction!(reconstruct, m)?)?;
    m.add_function(wrap_pyfunction!(write_snapshot, m)?)?;
    m.add_function(wrap_pyfunction!(toy_mlp_available, m)?)?;
    m.add_function(wrap_pyfunction!(toy_mlp_score, m)?)?;
    m.add_function(wrap_pyfunction!(toy_mlp_train_stack, m)?)?;
    Ok(())
}
