//! Snapshot store: standard safetensors files, memory-mapped for reading and written atomically.
//!
//! Reading validates the whole header before anything is used (header length in range, UTF-8
//! JSON, known dtypes, shapes matching byte lengths, offsets contiguous and inside the file),
//! so damaged or hostile files fail with an error naming the file. Nothing is ever unpickled.
//! Writing goes to a temporary file in the same directory, is fsynced, then renamed over the
//! final name: a reader sees the old file or the new one, never half of one. Every file the
//! store writes is created by [`OutputFile::create`], with the mode of any normal file creation
//! (`0o666` less the umask).

mod atomic;
mod header;
mod mapped;

pub use atomic::{write_atomic, OutputFile, TensorData};
pub use header::{parse_dtype, parse_header, Header, TensorEntry};
pub use mapped::MappedSnapshot;

/// Files the tests of this module share.
#[cfg(test)]
mod fixtures {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    use safetensors::tensor::Dtype;

    use super::{write_atomic, TensorData};

    /// A snapshot of two tensors ("w", F32 2x3 and "g", F16 2) with metadata nimg=42, written
    /// into `dir`.
    pub(super) fn sample_file(dir: &Path) -> PathBuf {
        let a: Vec<u8> = (0..24u8).collect();
        let b: Vec<u8> = vec![1, 2, 3, 4];
        let tensors = [
            TensorData {
                name: "w".into(),
                dtype: Dtype::F32,
                shape: vec![2, 3],
                data: &a,
            },
            TensorData {
                name: "g".into(),
                dtype: Dtype::F16,
                shape: vec![2],
                data: &b,
            },
        ];
        let meta = BTreeMap::from([("nimg".to_string(), "42".to_string())]);
        let path = dir.join("s.safetensors");
        write_atomic(&path, &tensors, &meta).unwrap();
        path
    }

    /// A test's directory, removed with what it holds when dropped.
    pub(super) struct TmpDir(PathBuf);

    impl std::ops::Deref for TmpDir {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl AsRef<Path> for TmpDir {
        fn as_ref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TmpDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A directory for the test `tag` of this process (created if missing, removed when the
    /// returned guard is dropped).
    pub(super) fn tmpdir(tag: &str) -> TmpDir {
        let d = std::env::temp_dir().join(format!("autoguide-store-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        TmpDir(d)
    }
}
