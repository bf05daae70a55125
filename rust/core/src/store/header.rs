//! The safetensors header: parsed and validated when a file is read, laid out when one is
//! written.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors};

use crate::error::{invalid, Error, Result};

/// One tensor of a snapshot: where its bytes are in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub begin: usize,
    pub end: usize,
}

/// The validated header of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Header {
    /// String metadata (`__metadata__`).
    pub metadata: BTreeMap<String, String>,
    /// Tensors in file order.
    pub tensors: Vec<TensorEntry>,
}

/// The error for a file at `path` that is not a valid safetensors file.
pub(super) fn format_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::Format {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Names what a non-safetensors file most likely is, for a helpful message.
fn sniff(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(b"PK\x03\x04") {
        Some("it is a zip archive, as torch.save writes; autoguide_fast never unpickles")
    } else if bytes.len() >= 2 && bytes[0] == 0x80 && (2..=5).contains(&bytes[1]) {
        Some("it is a Python pickle; autoguide_fast never unpickles")
    } else {
        None
    }
}

/// Validates `bytes` as a whole safetensors file and returns its header.
pub fn parse_header(path: &Path, bytes: &[u8]) -> Result<Header> {
    let (n, meta) = SafeTensors::read_metadata(bytes).map_err(|e| {
        let reason = match sniff(bytes) {
            Some(what) => format!("{e} ({what})"),
            None => e.to_string(),
        };
        format_error(path, reason)
    })?;
    let data_start = 8 + n;
    let mut tensors = Vec::new();
    for name in meta.offset_keys() {
        let info = meta
            .info(&name)
            .ok_or_else(|| format_error(path, format!("tensor {name} listed twice")))?;
        let (b, e) = info.data_offsets;
        tensors.push(TensorEntry {
            name,
            dtype: info.dtype,
            shape: info.shape.clone(),
            begin: data_start + b,
            end: data_start + e,
        });
    }
    let metadata = meta
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    Ok(Header { metadata, tensors })
}

/// Byte length of a tensor of `dtype` and `shape`, None on overflow.
pub(super) fn byte_len(dtype: Dtype, shape: &[usize]) -> Option<usize> {
    shape
        .iter()
        .try_fold(dtype.bitsize(), |acc, &d| acc.checked_mul(d))
        .map(|bits| bits.div_ceil(8))
}

/// Parses a safetensors dtype name ("F32", "BF16", ...), as the format spells them.
pub fn parse_dtype(name: &str) -> Result<Dtype> {
    serde_json::from_value(serde_json::Value::String(name.to_string())).map_err(|_| {
        invalid(
            "dtype",
            name,
            "a safetensors dtype such as F32, F16, BF16, I64",
        )
    })
}

/// The header of a file about to be written, and where its tensors go.
pub(super) struct HeaderLayout {
    /// The 8-byte little-endian JSON length, then the JSON, padded with spaces so that tensor
    /// data starts 8-byte aligned.
    pub(super) bytes: Vec<u8>,
    /// Per tensor, in the given order: (name, absolute begin, absolute end).
    pub(super) entries: Vec<(String, usize, usize)>,
    /// Where tensor data begins (the length of `bytes`).
    pub(super) data_start: usize,
    /// The length of the whole file.
    pub(super) file_len: u64,
}

/// Lays out the header of a file holding `tensors` (name, dtype, shape), in the given order,
/// and `metadata`. Names must be unique and not `__metadata__`; sizes are checked for
/// overflow.
pub(super) fn lay_out_header(
    tensors: &[(String, Dtype, Vec<usize>)],
    metadata: &BTreeMap<String, String>,
) -> Result<HeaderLayout> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).expect("strings serialise"),
        );
    }
    let too_big =
        |shape: &[usize]| invalid("shape", format!("{shape:?}"), "small enough to address");
    let mut offset = 0usize;
    let mut rel = Vec::with_capacity(tensors.len());
    for (name, dtype, shape) in tensors {
        if name == "__metadata__" || header.contains_key(name) {
            return Err(invalid(
                "tensors",
                name,
                "uniquely named, and not __metadata__",
            ));
        }
        let end = byte_len(*dtype, shape)
            .and_then(|bytes| offset.checked_add(bytes))
            .ok_or_else(|| too_big(shape))?;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype.to_string(), "shape": shape, "data_offsets": [offset, end]}),
        );
        rel.push((name.clone(), offset, end));
        offset = end;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header)).expect("valid JSON");
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let data_start = 8 + json.len();
    let file_len = data_start
        .checked_add(offset)
        .and_then(|n| u64::try_from(n).ok())
        .ok_or_else(|| invalid("tensors", offset, "small enough to address"))?;
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    let entries = rel
        .into_iter()
        .map(|(n, b, e)| (n, data_start + b, data_start + e))
        .collect();
    Ok(HeaderLayout {
        bytes,
        entries,
        data_start,
        file_len,
    })
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{sample_file, tmpdir};
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn dtype_names_round_trip() {
        for d in [
            Dtype::F32,
            Dtype::BF16,
            Dtype::F8_E4M3,
            Dtype::I64,
            Dtype::BOOL,
        ] {
            assert_eq!(parse_dtype(&d.to_string()).unwrap(), d);
        }
        assert!(parse_dtype("float32")
            .unwrap_err()
            .to_string()
            .starts_with("dtype"));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_header(Path::new("random"), &bytes);
        }

        #[test]
        fn mutated_files_never_panic_and_stay_in_bounds(pos in 0usize..200, val in any::<u8>(), cut in 0usize..200) {
            let dir = tmpdir("mut");
            let good = std::fs::read(sample_file(&dir)).unwrap();
            let mut bytes = good.clone();
            let p = pos % bytes.len();
            bytes[p] = val;
            bytes.truncate(bytes.len() - cut % bytes.len());
            if let Ok(h) = parse_header(Path::new("mutated"), &bytes) {
                for t in &h.tensors {
                    prop_assert!(t.begin <= t.end && t.end <= bytes.len());
                }
            }
        }
    }
}
