//! One work item of the reconstruction: the same elements of every input, weighted, summed
//! into every output in cache, checked finite, and written.

use safetensors::tensor::Dtype;

use super::accumulate::{accumulate, GROUP};
use super::convert::{from_f32, to_f32};
use super::plan::{Item, Plan, CHUNK};
use crate::error::{Error, Result};
use crate::store::{MappedSnapshot, OutputFile};

/// Elements per pass within a work item: the accumulators of this many elements of every output
/// and a group's converted inputs stay in the innermost caches.
const SUB: usize = 2048;

/// Padding (one cache line of f32) after each accumulator row and converted block. Without it
/// the rows (64 KiB apart) and blocks (8 KiB apart) all map to the same sets of the L1 cache and
/// evict one another: the accumulation ran ~20% slower.
const PAD: usize = 16;

/// Per-thread buffers of [`Pass::combine`], allocated once.
pub(super) struct Buffers {
    /// [`GROUP`] inputs' blocks of [`SUB`] elements converted to float32, [`PAD`] apart.
    scratch: Vec<f32>,
    /// The float32 accumulators of every output, [`CHUNK`] elements each, [`PAD`] apart.
    local: Vec<f32>,
    /// One output's chunk rounded to a 16-bit dtype.
    words: Vec<u16>,
}

impl Buffers {
    /// Buffers for a pass writing `outputs` files.
    pub(super) fn new(outputs: usize) -> Self {
        Self {
            scratch: vec![0.0; GROUP * (SUB + PAD)],
            local: vec![0.0; outputs * (CHUNK + PAD)],
            words: vec![0; CHUNK],
        }
    }
}

/// What every work item of one pass reads and writes.
pub(super) struct Pass<'a> {
    /// The inputs, memory-mapped.
    pub(super) snaps: &'a [MappedSnapshot],
    pub(super) plan: &'a Plan,
    /// The coefficients as float32, row-major `[input][output]`.
    pub(super) weights: &'a [f32],
    /// The outputs' temporary files.
    pub(super) files: &'a [OutputFile],
}

impl Pass<'_> {
    /// Combines `item` from every input into every output and writes it; fails with
    /// [`Error::NonFinite`] before writing a part that holds NaN or infinity.
    pub(super) fn combine(&self, item: Item, buffers: &mut Buffers) -> Result<()> {
        let Buffers {
            scratch,
            local,
            words,
        } = buffers;
        let (m, len) = (self.files.len(), item.hi - item.lo);
        for row in local.chunks_mut(CHUNK + PAD).take(m) {
            row[..len].fill(0.0);
        }
        for s0 in (0..len).step_by(SUB) {
            let s1 = (s0 + SUB).min(len);
            for start in (0..self.snaps.len()).step_by(GROUP) {
                self.accumulate_group(item, s0..s1, start, scratch, local);
            }
        }
        for (file, row) in self.files.iter().zip(local.chunks(CHUNK + PAD)) {
            let (bytes, finite) = from_f32(item.dtype, &row[..len], words);
            if !finite {
                return Err(self.non_finite(item, file));
            }
            file.write_at(file.data_start() + item.at, bytes)?;
        }
        Ok(())
    }

    /// Adds elements `sub` (relative to `item.lo`) of up to [`GROUP`] inputs from input `start`
    /// on, weighted, to the accumulators `local` of every output. Float32 inputs are read in
    /// place where aligned; the others are converted into `scratch`.
    fn accumulate_group(
        &self,
        item: Item,
        sub: std::ops::Range<usize>,
        start: usize,
        scratch: &mut [f32],
        local: &mut [f32],
    ) {
        let (m, count) = (self.files.len(), sub.end - sub.start);
        let group = start..(start + GROUP).min(self.snaps.len());
        let mut srcs: Vec<&[f32]> = Vec::with_capacity(GROUP);
        let mut free = scratch.chunks_mut(SUB + PAD);
        for i in group.clone() {
            let (lo, hi) = (item.lo + sub.start, item.lo + sub.end);
            let (dtype, range) = self.plan.input_range(i, item.tensor, lo, hi);
            let bytes = &self.snaps[i].bytes_all()[range];
            // SAFETY: every bit pattern is a valid f32; align_to only yields the aligned
            // middle part, used only when it covers the whole range.
            let (head, direct, _) = unsafe { bytes.align_to::<f32>() };
            if dtype == Dtype::F32 && head.is_empty() && direct.len() == count {
                srcs.push(direct);
            } else {
                let buf = &mut free.next().expect("one scratch block per group member")[..count];
                to_f32(dtype, bytes, buf);
                srcs.push(buf);
            }
        }
        let mut outs: Vec<&mut [f32]> = local
            .chunks_mut(CHUNK + PAD)
            .take(m)
            .map(|row| &mut row[sub.clone()])
            .collect();
        accumulate(&self.weights[start * m..group.end * m], &srcs, &mut outs);
    }

    /// The error for elements `item.lo..item.hi` of output `file` holding NaN or infinity,
    /// naming the first input that holds one there, or else the overflow. Only on the failure
    /// path: reads the range of every input once more.
    fn non_finite(&self, item: Item, file: &OutputFile) -> Error {
        let mut values = vec![0.0f32; item.hi - item.lo];
        let culprit = self.snaps.iter().enumerate().find(|(i, snap)| {
            let (dtype, range) = self.plan.input_range(*i, item.tensor, item.lo, item.hi);
            to_f32(dtype, &snap.bytes_all()[range], &mut values);
            values.iter().any(|v| !v.is_finite())
        });
        let cause = match culprit {
            Some((_, snap)) => format!(
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
            tensor: self.plan.name(item.tensor).to_string(),
            cause,
        }
    }
}
