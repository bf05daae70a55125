//! The layout of one reconstruction pass, validated before any tensor data is read: which
//! tensors are averaged and which copied, where each lies in every input and output, and the
//! work items the averaged ones are split into.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};

use safetensors::tensor::Dtype;

use super::convert::is_float;
use crate::error::{Error, Result};
use crate::store::{MappedSnapshot, OutputFile, TensorEntry};

/// Elements per work item: each output's part is written at once.
pub(super) const CHUNK: usize = 1 << 14;

/// A tensor's name, dtype and shape.
type TensorSpec = (String, Dtype, Vec<usize>);

/// One work item of [`reconstruct`](fn@super::reconstruct): elements `lo..hi` of layout tensor
/// `tensor`, written as `dtype` from byte `at` of tensor data on (the same in every output,
/// whose headers may differ in length).
#[derive(Debug, Clone, Copy)]
pub(super) struct Item {
    pub(super) tensor: usize,
    pub(super) lo: usize,
    pub(super) hi: usize,
    pub(super) at: usize,
    pub(super) dtype: Dtype,
}

impl Item {
    /// The end of the item's bytes, from the start of tensor data.
    pub(super) fn end(&self) -> usize {
        self.at + (self.hi - self.lo) * (self.dtype.bitsize() / 8)
    }
}

/// What one pass reads and writes.
pub(super) struct Plan {
    /// The tensors of the first input, in its file order.
    layout: Vec<TensorSpec>,
    /// Per input, per layout tensor: (dtype, absolute byte offset).
    offsets: Vec<Vec<(Dtype, usize)>>,
    /// Layout indices of the averaged tensors, in output order.
    averaged: Vec<usize>,
    /// Layout indices of the tensors copied from the last input, in output order.
    copied: Vec<usize>,
    /// The tensors of every output: the averaged ones first (so that a run of work items is
    /// one contiguous byte range of every output), then the copied ones.
    spec: Vec<TensorSpec>,
}

/// Per layout tensor, the dtype and absolute byte offset of the tensor of the same name in
/// `snap` (read from `path`), checking that it has the same tensor names, shapes and kinds
/// (float or not) as the first input, read from `first`.
fn tensor_offsets(
    snap: &MappedSnapshot,
    path: &Path,
    first: &Path,
    layout: &[TensorSpec],
) -> Result<Vec<(Dtype, usize)>> {
    let names: BTreeMap<&str, &TensorEntry> = snap
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
            first.display(),
            layout.len()
        )));
    }
    let mut row = Vec::with_capacity(layout.len());
    for (name, dtype, shape) in layout {
        let t = names.get(name.as_str()).ok_or_else(|| {
            fail(format!(
                "tensor {name} is missing (present in {})",
                first.display()
            ))
        })?;
        if &t.shape != shape {
            return Err(fail(format!(
                "tensor {name} has shape {:?}, but {shape:?} in {}",
                t.shape,
                first.display()
            )));
        }
        if is_float(t.dtype) != is_float(*dtype) {
            return Err(fail(format!(
                "tensor {name} has dtype {}, but {dtype} in {}",
                t.dtype,
                first.display()
            )));
        }
        row.push((t.dtype, t.begin));
    }
    Ok(row)
}

impl Plan {
    /// The plan for averaging `snaps` (read from `inputs`) into outputs of `dtype` (None: the
    /// dtype the inputs share, float32 where they differ), copying the tensors in `copy` and
    /// the non-float ones from the last input. Fails if the inputs differ in tensor names,
    /// shapes or kinds.
    pub(super) fn new(
        snaps: &[MappedSnapshot],
        inputs: &[PathBuf],
        copy: &BTreeSet<String>,
        dtype: Option<Dtype>,
    ) -> Result<Self> {
        let layout: Vec<TensorSpec> = snaps[0]
            .header()
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
            .collect();
        let offsets = snaps
            .iter()
            .zip(inputs)
            .map(|(snap, path)| tensor_offsets(snap, path, &inputs[0], &layout))
            .collect::<Result<Vec<_>>>()?;
        let averaged: Vec<usize> = (0..layout.len())
            .filter(|&t| is_float(layout[t].1) && !copy.contains(&layout[t].0))
            .collect();
        let copied: Vec<usize> = (0..layout.len())
            .filter(|t| !averaged.contains(t))
            .collect();
        let output_dtype = |t: usize| {
            dtype.unwrap_or_else(|| {
                let first = offsets[0][t].0;
                if offsets.iter().all(|row| row[t].0 == first) {
                    first
                } else {
                    Dtype::F32
                }
            })
        };
        let last = &offsets[offsets.len() - 1];
        let spec = averaged
            .iter()
            .map(|&t| (t, output_dtype(t)))
            .chain(copied.iter().map(|&t| (t, last[t].0)))
            .map(|(t, dtype)| (layout[t].0.clone(), dtype, layout[t].2.clone()))
            .collect();
        Ok(Self {
            layout,
            offsets,
            averaged,
            copied,
            spec,
        })
    }

    /// The tensors of every output (name, dtype, shape), in file order.
    pub(super) fn spec(&self) -> &[TensorSpec] {
        &self.spec
    }

    /// The name of layout tensor `t`.
    pub(super) fn name(&self, t: usize) -> &str {
        &self.layout[t].0
    }

    /// The copied tensors: (name, index of the output entry that holds it).
    pub(super) fn copied(&self) -> impl Iterator<Item = (&str, usize)> {
        let first = self.averaged.len();
        self.copied
            .iter()
            .enumerate()
            .map(move |(k, &t)| (self.name(t), first + k))
    }

    /// Input `i`'s bytes of elements `lo..hi` of layout tensor `t`: their dtype there, and
    /// their absolute byte range in the input file.
    pub(super) fn input_range(
        &self,
        i: usize,
        t: usize,
        lo: usize,
        hi: usize,
    ) -> (Dtype, Range<usize>) {
        let (dtype, begin) = self.offsets[i][t];
        let size = dtype.bitsize() / 8;
        (dtype, begin + lo * size..begin + hi * size)
    }

    /// The averaged tensors split into work items of [`CHUNK`] elements, in output byte order;
    /// `file` is any output created from [`Plan::spec`] (tensor data offsets are the same in
    /// all of them).
    pub(super) fn items(&self, file: &OutputFile) -> Vec<Item> {
        let data_offset = |k: usize| file.entries()[k].1 - file.data_start();
        self.averaged
            .iter()
            .enumerate()
            .flat_map(|(k, &t)| {
                // Offsets from the start of tensor data, in the output dtype's element size.
                let (begin, out) = (data_offset(k), self.spec[k].1);
                let numel = self.layout[t].2.iter().product::<usize>();
                (0..numel).step_by(CHUNK).map(move |lo| Item {
                    tensor: t,
                    lo,
                    hi: (lo + CHUNK).min(numel),
                    at: begin + lo * (out.bitsize() / 8),
                    dtype: out,
                })
            })
            .collect()
    }
}
