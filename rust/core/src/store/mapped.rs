//! Reading: snapshots memory-mapped and validated, their tensor bytes borrowed from the map.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::header::{format_error, parse_header, Header};
use crate::error::{io_error, Result};

/// A memory-mapped, validated snapshot. Tensor bytes are borrowed from the map (no copies).
pub struct MappedSnapshot {
    path: PathBuf,
    map: Mmap,
    header: Header,
}

impl MappedSnapshot {
    /// Maps `path` read-only and validates it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| io_error(&path, e))?;
        if file.metadata().map_err(|e| io_error(&path, e))?.len() == 0 {
            return Err(format_error(&path, "the file is empty"));
        }
        // SAFETY: the map is read-only and we never write through it. Files are replaced by
        // rename (a new inode), never rewritten in place, by this library; a third party
        // truncating the file while it is mapped is outside what any mmap reader can guard.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| io_error(&path, e))?;
        let header = parse_header(&path, &map)?;
        Ok(Self { path, map, header })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The whole mapped file (tensor byte ranges in the header are absolute offsets into it).
    pub fn bytes_all(&self) -> &[u8] {
        &self.map
    }

    /// Prepares the map for one streaming pass that releases pages as it goes (see
    /// [`MappedSnapshot::release`]): pages are mapped 4 KiB at a time, since a 2 MiB mapping
    /// of a huge page-cache folio would keep up to 2 MiB resident per file until the whole
    /// block has been read, or be split by a partial release. Best effort.
    pub fn prepare_streaming(&self) {
        #[cfg(target_os = "linux")]
        let _ = self.map.advise(memmap2::Advice::NoHugePage);
    }

    /// Drops the resident pages of the byte range `[begin, end)` (rounded inwards to whole
    /// pages) from this process; later reads fault them back from the page cache. Used by
    /// streaming readers to keep resident memory small. Best effort: errors are ignored.
    pub fn release(&self, begin: usize, end: usize) {
        const PAGE: usize = 4096;
        let (lo, hi) = (begin.div_ceil(PAGE) * PAGE, end / PAGE * PAGE);
        if hi > lo && hi <= self.map.len() {
            // SAFETY: the map is a read-only file mapping; MADV_DONTNEED on it only drops
            // resident pages, and later reads see the file's contents again. No Rust reference
            // into the range is used across this call by the streaming caller.
            #[cfg(unix)]
            let _ = unsafe {
                self.map
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, lo, hi - lo)
            };
        }
    }

    /// Raw little-endian bytes of tensor `name`.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let entry = self
            .header
            .tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| format_error(&self.path, format!("no tensor named {name:?}")))?;
        Ok(&self.map[entry.begin..entry.end])
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{sample_file, tmpdir};
    use super::*;
    use crate::error::Error;

    #[test]
    fn round_trip() {
        let dir = tmpdir("rt");
        let path = sample_file(&dir);
        let snap = MappedSnapshot::open(&path).unwrap();
        assert_eq!(snap.header().metadata["nimg"], "42");
        assert_eq!(
            snap.bytes("w").unwrap(),
            (0..24u8).collect::<Vec<_>>().as_slice()
        );
        assert_eq!(snap.bytes("g").unwrap(), &[1, 2, 3, 4]);
        assert_eq!(snap.header().tensors.len(), 2);
        assert!(snap.bytes("missing").is_err());
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    }

    #[test]
    fn names_pickles_and_missing_files() {
        let dir = tmpdir("pk");
        let p = dir.join("model.safetensors");
        std::fs::write(&p, b"\x80\x04\x95 pickle bytes here").unwrap();
        let err = MappedSnapshot::open(&p).err().unwrap().to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("pickle"),
            "{err}"
        );
        std::fs::write(&p, b"PK\x03\x04 zip").unwrap();
        assert!(MappedSnapshot::open(&p)
            .err()
            .unwrap()
            .to_string()
            .contains("zip"));
        assert!(matches!(
            MappedSnapshot::open(dir.join("nope")),
            Err(Error::NotFound { .. })
        ));
    }
}
