//! The streaming reconstruction: one pass over memory-mapped snapshots writes every requested
//! output, batch by batch.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Mutex;

use rayon::prelude::*;
use safetensors::tensor::Dtype;

use super::combine::{Buffers, Pass};
use super::convert::is_float;
use super::pages::InputPages;
use super::plan::{Item, Plan};
use super::solve::MAX_SNAPSHOTS;
use crate::error::{invalid, Error, Result};
use crate::store::{MappedSnapshot, OutputFile};

/// One requested output of [`reconstruct`].
#[derive(Debug, Clone)]
pub struct Output {
    pub path: PathBuf,
    pub metadata: BTreeMap<String, String>,
}

/// Most outputs one [`reconstruct`] pass writes: each holds an open file and a float32
/// accumulator of 64 KiB per worker thread.
pub const MAX_OUTPUTS: usize = 256;

/// The counts of [`reconstruct`]'s arguments (`n` inputs, `m` outputs, `coefs` coefficients)
/// and the requested dtype, checked before anything is opened or allocated.
fn check_arguments(n: usize, m: usize, coefs: usize, dtype: Option<Dtype>) -> Result<()> {
    if n == 0 || m == 0 {
        return Err(invalid("inputs", n, "at least one input and one output"));
    }
    if n > MAX_SNAPSHOTS {
        return Err(invalid("inputs", n, "at most 4096 snapshots"));
    }
    if m > MAX_OUTPUTS {
        return Err(invalid("outputs", m, "at most 256 files per pass"));
    }
    if coefs != n * m {
        return Err(Error::ShapeMismatch {
            what: "coefs (inputs x outputs)",
            expected: n * m,
            got: coefs,
        });
    }
    if let Some(d) = dtype.filter(|&d| !is_float(d)) {
        return Err(invalid("dtype", d, "F32, F16 or BF16"));
    }
    Ok(())
}

/// Maps every input, prepared for one streaming pass.
fn open_inputs(inputs: &[PathBuf]) -> Result<Vec<MappedSnapshot>> {
    inputs
        .iter()
        .map(|p| {
            let snap = MappedSnapshot::open(p)?;
            snap.prepare_streaming();
            Ok(snap)
        })
        .collect()
}

/// Creates the temporary file of every output, laid out as `plan` says, and writes into each
/// the tensors copied from `last` (the last input) right away.
fn create_outputs(
    outputs: &[Output],
    plan: &Plan,
    last: &MappedSnapshot,
) -> Result<Vec<OutputFile>> {
    let files = outputs
        .iter()
        .map(|o| OutputFile::create(&o.path, plan.spec(), &o.metadata))
        .collect::<Result<Vec<_>>>()?;
    for file in &files {
        for (name, entry) in plan.copied() {
            file.write_at(file.entries()[entry].1, last.bytes(name)?)?;
        }
    }
    Ok(files)
}

/// The housekeeping of a computed `batch`, run while the next one is computed: its part of
/// every output is final, so its writeback to disk starts (and the fsync at the end finds
/// little left to do), and the input pages it read are released.
fn finish_batch(pass: &Pass<'_>, batch: &[Item], pages: &mut [InputPages]) {
    let (head, tail) = (batch[0], batch[batch.len() - 1]);
    for file in pass.files {
        let base = file.data_start();
        file.start_writeback(base + head.at, base + tail.end());
    }
    for ((i, snap), pages) in pass.snaps.iter().enumerate().zip(pages.iter_mut()) {
        let ranges: Vec<(usize, usize)> = batch
            .iter()
            .map(|item| {
                let (_, range) = pass.plan.input_range(i, item.tensor, item.lo, item.hi);
                (range.start, range.end)
            })
            .collect();
        pages.release_read(snap, &ranges);
    }
}

/// Computes `items` in batches of 1%, each in parallel while the previous one is finished
/// (see [`finish_batch`]); `progress(done, total)` after each batch.
fn run_batches(
    pass: &Pass<'_>,
    items: &[Item],
    mut progress: impl FnMut(usize, usize) -> Result<()>,
) -> Result<()> {
    let total = items.len();
    let per_batch = total.div_ceil(100).max(1);
    let mut done = 0;
    let buffers: Vec<Mutex<Buffers>> = (0..rayon::current_num_threads().max(1))
        .map(|_| Mutex::new(Buffers::new(pass.files.len())))
        .collect();
    let mut pages: Vec<InputPages> = (0..pass.snaps.len()).map(|_| Default::default()).collect();
    let mut previous: Option<&[Item]> = None;
    for batch in items.chunks(per_batch) {
        let (computed, ()) = rayon::join(
            || {
                batch.par_iter().try_for_each(|item| {
                    let slot = rayon::current_thread_index().unwrap_or(0) % buffers.len();
                    let mut guard = buffers[slot].lock().unwrap_or_else(|e| e.into_inner());
                    pass.combine(*item, &mut guard)
                })
            },
            || {
                if let Some(prev) = previous {
                    finish_batch(pass, prev, &mut pages);
                }
            },
        );
        computed?;
        previous = Some(batch);
        done += batch.len();
        progress(done, total)?;
    }
    if let Some(prev) = previous {
        finish_batch(pass, prev, &mut pages);
    }
    Ok(())
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
    progress: impl FnMut(usize, usize) -> Result<()>,
) -> Result<()> {
    check_arguments(inputs.len(), outputs.len(), coefs.len(), dtype)?;
    let snaps = open_inputs(inputs)?;
    let plan = Plan::new(&snaps, inputs, copy, dtype)?;
    let files = create_outputs(outputs, &plan, &snaps[snaps.len() - 1])?;
    // Outputs are written with positional writes into their temporary files; the work items
    // follow the averaged tensors in output order, so a batch is one contiguous byte range of
    // every output.
    let items = plan.items(&files[0]);
    let weights: Vec<f32> = coefs.iter().map(|&c| c as f32).collect(); // [in][out]
    let pass = Pass {
        snaps: &snaps,
        plan: &plan,
        weights: &weights,
        files: &files,
    };
    run_batches(&pass, &items, progress)?;
    OutputFile::commit_all(files)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::plan::CHUNK;
    use super::super::solve::{solve_coefficients, MAX_PROFILES};
    use super::*;

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
}
