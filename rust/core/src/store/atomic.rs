//! Writing: every file the store writes is laid out, written with positional writes into a
//! temporary file in the destination directory, validated, fsynced and renamed into place.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::tensor::Dtype;

use super::header::{byte_len, lay_out_header, parse_header};
use crate::error::{invalid, io_error, Error, Result};

/// The directory of `path` and a temporary file name next to it, unique to this process.
fn temp_path(path: &Path) -> Result<(PathBuf, PathBuf)> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| invalid("path", path.display(), "a file path"))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    Ok((dir, tmp))
}

/// Creates (or truncates) the temporary file `tmp` for reading and writing.
fn create_temporary(tmp: &Path) -> Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true).create(true).truncate(true);
    // The mode of a normal file (see [`OutputFile`]'s documentation); the kernel takes the
    // umask off it. Explicit so that the permissions of snapshots never depend on a default.
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o666);
    options.open(tmp).map_err(|e| io_error(tmp, e))
}

/// Makes a rename in `dir` durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(dir, e))
}

/// A borrowed tensor to write.
#[derive(Debug, Clone)]
pub struct TensorData<'a> {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

/// Writes `tensors` and `metadata` to `path` atomically (temporary file, fsync, rename, fsync
/// of the directory), through [`OutputFile`]. Shapes must match byte lengths; names must be
/// unique. Tensors are laid out as the safetensors serialiser lays them out (by descending
/// dtype, then by name), so that every tensor starts aligned to its element size.
pub fn write_atomic(
    path: impl AsRef<Path>,
    tensors: &[TensorData<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    for t in tensors {
        let want = byte_len(t.dtype, &t.shape);
        if want != Some(t.data.len()) {
            return Err(Error::ShapeMismatch {
                what: "tensor bytes (shape x dtype size)",
                expected: want.unwrap_or(usize::MAX),
                got: t.data.len(),
            });
        }
    }
    let mut order: Vec<&TensorData<'_>> = tensors.iter().collect();
    order.sort_by(|a, b| b.dtype.cmp(&a.dtype).then_with(|| a.name.cmp(&b.name)));
    let spec: Vec<(String, Dtype, Vec<usize>)> = order
        .iter()
        .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
        .collect();
    let out = OutputFile::create(path, &spec, metadata)?;
    for (t, &(_, begin, _)) in order.iter().zip(out.entries()) {
        out.write_at(begin, t.data)?;
    }
    out.commit()
}

/// A safetensors file written piecewise with positional writes: the header is laid out
/// first, callers write tensor bytes at their ranges from any thread (no whole-file buffer, no
/// zero-filled pages), may start writeback of finished ranges while others are still being
/// computed, and [`OutputFile::commit`] validates, fsyncs and renames it into place. Dropped
/// without a commit, the temporary file is removed.
///
/// This is where every file of the store is created, with mode `0o666` less the process's
/// umask, as any normal file creation (the kernel applies the umask); not the `0o600` of
/// secure temporary files (e.g. the `tempfile` crate, which `safetensors::serialize_to_file`
/// uses), which a rename would carry over to the final file.
pub struct OutputFile {
    tmp: PathBuf,
    path: PathBuf,
    file: File,
    /// (name, absolute begin, absolute end), in file order.
    entries: Vec<(String, usize, usize)>,
    data_start: usize,
    committed: bool,
}

impl OutputFile {
    /// Creates the temporary file for `path` with room for `tensors` (name, dtype, shape), in
    /// the given order, and writes the header. Tensor data starts 8-byte aligned. Names must be
    /// unique and not `__metadata__`; sizes are checked for overflow before anything is
    /// created.
    pub fn create(
        path: impl AsRef<Path>,
        tensors: &[(String, Dtype, Vec<usize>)],
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let header = lay_out_header(tensors, metadata)?;
        let (_, tmp) = temp_path(&path)?;
        let file = create_temporary(&tmp)?;
        let out = Self {
            tmp,
            path,
            file,
            entries: header.entries,
            data_start: header.data_start,
            committed: false,
        };
        // From here on, dropping `out` removes the temporary file.
        out.file
            .set_len(header.file_len)
            .map_err(|e| io_error(&out.tmp, e))?;
        out.write_at(0, &header.bytes)?;
        Ok(out)
    }

    /// The final path (where [`OutputFile::commit`] puts the file).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensors' byte ranges (absolute, file order).
    pub fn entries(&self) -> &[(String, usize, usize)] {
        &self.entries
    }

    /// Where tensor data begins (after the header, whose length depends on the metadata).
    pub fn data_start(&self) -> usize {
        self.data_start
    }

    /// Writes `bytes` at absolute offset `at`. Safe to call from several threads at once for
    /// disjoint ranges.
    pub fn write_at(&self, at: usize, bytes: &[u8]) -> Result<()> {
        #[cfg(unix)]
        let written = std::os::unix::fs::FileExt::write_all_at(&self.file, bytes, at as u64);
        #[cfg(windows)]
        let written = (|| {
            let (mut at, mut rest) = (at as u64, bytes);
            while !rest.is_empty() {
                let n = std::os::windows::fs::FileExt::seek_write(&self.file, rest, at)?;
                if n == 0 {
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
                (at, rest) = (at + n as u64, &rest[n..]);
            }
            Ok(())
        })();
        written.map_err(|e| io_error(&self.tmp, e))
    }

    /// Starts writing the byte range `[begin, end)` back to disk without waiting for it, so
    /// that the final fsync finds little left to do. Best effort (a no-op off Linux).
    pub fn start_writeback(&self, begin: usize, end: usize) {
        #[cfg(target_os = "linux")]
        if end > begin {
            use std::os::fd::AsRawFd;
            // SAFETY: a plain syscall on a file descriptor this struct owns; it only schedules
            // I/O of the file's own dirty pages.
            unsafe {
                libc::sync_file_range(
                    self.file.as_raw_fd(),
                    begin as libc::off64_t,
                    (end - begin) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (begin, end);
    }

    /// Validates the written file, flushes it to disk and renames it over the final path.
    pub fn commit(self) -> Result<()> {
        Self::commit_all(vec![self])
    }

    /// Commits several files: all are validated and fsynced (in parallel, so that their
    /// flushes share journal commits) before any is renamed into place; then each directory
    /// is synced once. On an error before the renames, no file is renamed and the temporary
    /// files are removed.
    pub fn commit_all(files: Vec<Self>) -> Result<()> {
        files.par_iter().try_for_each(|f| {
            // SAFETY: read-only map of our own temporary file, used only for the validation.
            let map = unsafe { Mmap::map(&f.file) }.map_err(|e| io_error(&f.tmp, e))?;
            parse_header(&f.tmp, &map)?;
            drop(map);
            f.file.sync_all().map_err(|e| io_error(&f.tmp, e))
        })?;
        let mut dirs = std::collections::BTreeSet::new();
        for mut f in files {
            std::fs::rename(&f.tmp, &f.path).map_err(|e| io_error(&f.path, e))?;
            f.committed = true;
            dirs.insert(temp_path(&f.path)?.0);
        }
        dirs.iter().try_for_each(|d| sync_dir(d))
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{sample_file, tmpdir};
    use super::super::MappedSnapshot;
    use super::*;

    #[test]
    fn rejects_wrong_sizes_and_duplicates() {
        let dir = tmpdir("bad");
        let d = [0u8; 8];
        let t = TensorData {
            name: "x".into(),
            dtype: Dtype::F32,
            shape: vec![3],
            data: &d,
        };
        assert!(write_atomic(dir.join("a"), std::slice::from_ref(&t), &BTreeMap::new()).is_err());
        let t = TensorData {
            shape: vec![2],
            ..t
        };
        assert!(write_atomic(dir.join("b"), &[t.clone(), t], &BTreeMap::new()).is_err());
        assert!(!dir.join("a").exists() && !dir.join("b").exists());
    }

    #[test]
    fn output_file_round_trip() {
        let dir = tmpdir("mo");
        let path = dir.join("o.safetensors");
        let spec = vec![
            ("a".to_string(), Dtype::F32, vec![3]),
            ("b".to_string(), Dtype::BF16, vec![1]),
        ];
        let meta = BTreeMap::from([("k".to_string(), "v".to_string())]);
        let out = OutputFile::create(&path, &spec, &meta).unwrap();
        let ranges = out.entries().to_vec();
        assert_eq!(ranges[0].1 % 8, 0);
        out.write_at(ranges[0].1 + 4, &[0, 0, 0, 64, 0, 0, 64, 64])
            .unwrap();
        out.write_at(ranges[0].1, &[0, 0, 128, 63]).unwrap();
        out.start_writeback(ranges[0].1, ranges[0].2);
        out.commit().unwrap();
        let snap = MappedSnapshot::open(&path).unwrap();
        assert_eq!(snap.header().metadata["k"], "v");
        assert_eq!(
            snap.bytes("a").unwrap(),
            &[0, 0, 128, 63, 0, 0, 0, 64, 0, 0, 64, 64]
        );
        // Dropped without commit: nothing is left behind.
        drop(OutputFile::create(dir.join("x.safetensors"), &spec, &meta).unwrap());
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("o.safetensors")]);
    }

    #[cfg(unix)]
    #[test]
    fn files_get_the_mode_of_a_normal_file_creation() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tmpdir("mode");
        let spec = vec![("a".to_string(), Dtype::F32, vec![1])];
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        for (umask, want) in [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)] {
            // SAFETY: umask(2) cannot fail and touches no memory. It is process-wide: files the
            // other tests of this binary create meanwhile get this mask, which none of them
            // checks; the old mask is restored right after the writes.
            let old = unsafe { libc::umask(umask) };
            let snapshot = sample_file(&dir);
            let out = OutputFile::create(dir.join("o.safetensors"), &spec, &BTreeMap::new());
            let committed = out.and_then(|o| o.commit());
            // SAFETY: as above.
            unsafe { libc::umask(old) };
            committed.unwrap();
            assert_eq!(mode(&snapshot), want, "write_atomic, umask {umask:o}");
            assert_eq!(
                mode(&dir.join("o.safetensors")),
                want,
                "OutputFile, umask {umask:o}"
            );
        }
    }

    #[test]
    fn layout_matches_the_safetensors_serialiser() {
        // Descending dtype, then name: the tensor bytes land where `safetensors::serialize`
        // puts them.
        let (a, b, c, d) = ([1u8; 8], [2u8; 2], [3u8; 4], [4u8; 2]);
        let tensors = [
            TensorData {
                name: "z".into(),
                dtype: Dtype::F16,
                shape: vec![1],
                data: &d,
            },
            TensorData {
                name: "y".into(),
                dtype: Dtype::F32,
                shape: vec![1],
                data: &c,
            },
            TensorData {
                name: "x".into(),
                dtype: Dtype::I64,
                shape: vec![],
                data: &a,
            },
            TensorData {
                name: "w".into(),
                dtype: Dtype::F16,
                shape: vec![1],
                data: &b,
            },
        ];
        let dir = tmpdir("layout");
        let path = dir.join("l.safetensors");
        write_atomic(&path, &tensors, &BTreeMap::new()).unwrap();
        let names: Vec<String> = MappedSnapshot::open(&path)
            .unwrap()
            .header()
            .tensors
            .iter()
            .map(|t| t.name.clone())
            .collect();
        assert_eq!(names, ["x", "y", "w", "z"]);
        let theirs = safetensors::serialize(
            tensors.iter().map(|t| {
                let view =
                    safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), t.data).unwrap();
                (t.name.clone(), view)
            }),
            None,
        )
        .unwrap();
        let ours = std::fs::read(&path).unwrap();
        let data =
            |b: &[u8]| b[8 + u64::from_le_bytes(b[..8].try_into().unwrap()) as usize..].to_vec();
        assert_eq!(data(&ours), data(&theirs));
        let err = write_atomic(
            dir.join("m.safetensors"),
            &[TensorData {
                name: "__metadata__".into(),
                ..tensors[0].clone()
            }],
            &BTreeMap::new(),
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("tensors must be"), "{err}");
    }
}
