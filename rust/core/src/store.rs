//! Snapshot store: standard safetensors files, memory-mapped for reading and written atomically.
//!
//! Reading validates the whole header before anything is used (header length in range, UTF-8
//! JSON, known dtypes, shapes matching byte lengths, offsets contiguous and inside the file),
//! so damaged or hostile files fail with an error naming the file. Nothing is ever unpickled.
//! Writing goes to a temporary file in the same directory, is fsynced, then renamed over the
//! final name: a reader sees the old file or the new one, never half of one. Every file the
//! store writes is created by [`OutputFile::create`], with the mode of any normal file creation
//! (`0o666` less the umask).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::tensor::{Dtype, SafeTensors};

use crate::error::{io_error, Error, Result};

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

/// A memory-mapped, validated snapshot. Tensor bytes are borrowed from the map (no copies).
pub struct MappedSnapshot {
    path: PathBuf,
    map: Mmap,
    header: Header,
}

fn format_error(path: &Path, reason: impl Into<String>) -> Error {
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

/// Byte length of a tensor of `dtype` and `shape`, None on overflow.
fn byte_len(dtype: Dtype, shape: &[usize]) -> Option<usize> {
    shape
        .iter()
        .try_fold(dtype.bitsize(), |acc, &d| acc.checked_mul(d))
        .map(|bits| bits.div_ceil(8))
}

/// The directory of `path` and a temporary file name next to it, unique to this process.
fn temp_path(path: &Path) -> Result<(PathBuf, PathBuf)> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| crate::error::invalid("path", path.display(), "a file path"))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    Ok((dir, tmp))
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

/// Parses a safetensors dtype name ("F32", "BF16", ...), as the format spells them.
pub fn parse_dtype(name: &str) -> Result<Dtype> {
    serde_json::from_value(serde_json::Value::String(name.to_string())).map_err(|_| {
        crate::error::invalid(
            "dtype",
            name,
            "a safetensors dtype such as F32, F16, BF16, I64",
        )
    })
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
        let mut header = serde_json::Map::new();
        if !metadata.is_empty() {
            header.insert(
                "__metadata__".into(),
                serde_json::to_value(metadata).expect("strings serialise"),
            );
        }
        let too_big = |shape: &[usize]| {
            crate::error::invalid("shape", format!("{shape:?}"), "small enough to address")
        };
        let mut offset = 0usize;
        let mut rel = Vec::with_capacity(tensors.len());
        for (name, dtype, shape) in tensors {
            if name == "__metadata__" || header.contains_key(name) {
                return Err(crate::error::invalid(
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
            .ok_or_else(|| crate::error::invalid("tensors", offset, "small enough to address"))?;
        let (_, tmp) = temp_path(&path)?;
        let mut options = std::fs::OpenOptions::new();
        options.read(true).write(true).create(true).truncate(true);
        // The mode of a normal file (see the struct's documentation); the kernel takes the umask
        // off it. Explicit so that the permissions of snapshots never depend on a default.
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o666);
        let file = options.open(&tmp).map_err(|e| io_error(&tmp, e))?;
        let mut head = (json.len() as u64).to_le_bytes().to_vec();
        head.extend_from_slice(&json);
        let entries = rel
            .into_iter()
            .map(|(n, b, e)| (n, data_start + b, data_start + e))
            .collect();
        let out = Self {
            tmp,
            path,
            file,
            entries,
            data_start,
            committed: false,
        };
        // From here on, dropping `out` removes the temporary file.
        out.file
            .set_len(file_len)
            .map_err(|e| io_error(&out.tmp, e))?;
        out.write_at(0, &head)?;
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
    use super::*;
    use proptest::prelude::*;

    fn sample_file(dir: &Path) -> PathBuf {
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

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("autoguide-store-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

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
