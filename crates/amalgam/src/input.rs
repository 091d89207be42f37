//! Reading safetensors inputs lazily: the header is parsed and validated up front; tensor data is
//! read on demand with positioned reads (`pread`) of one cache-sized chunk at a time into a reused
//! aligned buffer, then decoded into the compute type. Nothing is memory-mapped, so the process's
//! resident memory is exactly the engine's buffers, whatever the number and size of the inputs
//! (a mapping would count every page read as resident until unmapped), and an input truncated
//! during a merge is an I/O error, not a crash.

use crate::dtype::{dtype_name, FloatDtype};
use crate::error::{Error, Result};
use crate::real::Real;
use safetensors::tensor::TensorInfo;
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Header facts about one tensor of an input file.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte offset of the tensor's data in the file.
    pub offset: u64,
    /// Length of the tensor's data in bytes.
    pub len: u64,
}

impl TensorEntry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// The float dtype, if this tensor is one amalgam merges.
    pub fn float_dtype(&self) -> Option<FloatDtype> {
        FloatDtype::from_safetensors(self.dtype)
    }
}

/// One opened safetensors file.
#[derive(Debug)]
pub struct ModelFile {
    path: PathBuf,
    file: File,
    size: u64,
    tensors: BTreeMap<String, TensorEntry>,
    metadata: BTreeMap<String, String>,
    /// Bytes of tensor data read so far.
    read: std::sync::atomic::AtomicU64,
}

/// A tensor's raw bytes held in memory (see [`ModelFile::read_whole`]), in words so that they are
/// aligned for decoding.
pub(crate) struct RawTensor {
    words: Vec<u64>,
    skip: usize,
    len: usize,
}

impl RawTensor {
    pub(crate) fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice::<u64, u8>(&self.words)[self.skip..self.skip + self.len]
    }
}

/// The largest header amalgam accepts (the safetensors limit).
const MAX_HEADER: u64 = 100_000_000;

impl ModelFile {
    /// Opens `path` and validates its header: length, JSON, dtypes, contiguous in-range offsets, and
    /// that the data section ends exactly at the end of the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        // Checked before opening: opening a FIFO for reading blocks until a writer comes.
        if let Some(problem) = path_problem(&path) {
            return Err(Error::io(&path, problem.into_io()));
        }
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let file_meta = file.metadata().map_err(|e| Error::io(&path, e))?;
        if !file_meta.is_file() {
            let problem = PathProblem::NotRegular(file_kind(&file_meta.file_type()));
            return Err(Error::io(&path, problem.into_io()));
        }
        let size = file_meta.len();
        if size < 8 {
            return Err(Error::bad_file(
                &path,
                format!("file is {size} bytes, shorter than the 8-byte header length"),
            ));
        }
        let mut len_bytes = [0u8; 8];
        read_exact_at(&file, &mut len_bytes, 0).map_err(|e| Error::io(&path, e))?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_HEADER {
            return Err(Error::bad_file(
                &path,
                format!("header length {header_len} exceeds the 100 MB limit"),
            ));
        }
        if 8 + header_len > size {
            return Err(Error::bad_file(
                &path,
                format!(
                    "header length {header_len} runs past the end of the file ({size} bytes): truncated or not safetensors"
                ),
            ));
        }
        let mut header = vec![0u8; header_len as usize];
        read_exact_at(&file, &mut header, 8).map_err(|e| Error::io(&path, e))?;
        let (infos, metadata) = parse_header(&header).map_err(|m| Error::bad_file(&path, m))?;
        let data_start = 8 + header_len;
        let data_len = infos
            .iter()
            .map(|(_, i)| i.data_offsets.1)
            .max()
            .unwrap_or(0) as u64;
        let follow = size - data_start;
        if data_len > follow {
            return Err(Error::bad_file(
                &path,
                format!(
                    "truncated: the header describes {data_len} bytes of tensor data but only {follow} follow it"
                ),
            ));
        }
        if data_len < follow {
            return Err(Error::bad_file(
                &path,
                format!(
                    "{} bytes after the last tensor's data: the header does not cover the file",
                    follow - data_len
                ),
            ));
        }
        let tensors = infos
            .into_iter()
            .map(|(name, info)| {
                let (s, e) = info.data_offsets;
                let entry = TensorEntry {
                    dtype: info.dtype,
                    shape: info.shape,
                    offset: data_start + s as u64,
                    len: (e - s) as u64,
                };
                (name, entry)
            })
            .collect();
        Ok(ModelFile {
            path,
            file,
            size,
            tensors,
            metadata,
            read: Default::default(),
        })
    }

    /// Bytes of tensor data read from this file so far (by every read method, all threads).
    pub fn bytes_read(&self) -> u64 {
        self.read.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn count(&self, n: usize) {
        self.read
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Reads the `len` bytes at absolute byte `offset` into memory, aligned to `width`.
    pub(crate) fn read_whole(&self, offset: u64, len: usize, width: usize) -> Result<RawTensor> {
        let mut words = Vec::new();
        let buf = line_matched_bytes(&mut words, len, offset, width);
        let at = buf.as_ptr() as usize;
        read_exact_at(&self.file, buf, offset).map_err(|e| Error::io(&self.path, e))?;
        self.count(len);
        let skip = at - words.as_ptr() as usize;
        Ok(RawTensor { words, skip, len })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn file_size(&self) -> u64 {
        self.size
    }
    /// Tensors by name, in name order.
    pub fn tensors(&self) -> &BTreeMap<String, TensorEntry> {
        &self.tensors
    }
    pub fn tensor(&self, key: &str) -> Option<&TensorEntry> {
        self.tensors.get(key)
    }
    /// The header's `__metadata__` map.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Reads elements `start..start + dst.len()` of float tensor `key` into `dst`, converting to the
    /// compute type. `scratch` holds a copy when the tensor's data is not aligned to its dtype.
    pub fn read_chunk<T: Real>(
        &self,
        key: &str,
        start: usize,
        dst: &mut [T],
        scratch: &mut Vec<u64>,
    ) -> Result<()> {
        let entry = self.tensors.get(key).ok_or_else(|| {
            Error::bad_file(&self.path, format!("tensor `{key}` is not in this file"))
        })?;
        let dtype = entry.float_dtype().ok_or_else(|| Error::UnsupportedDtype {
            path: self.path.clone(),
            key: key.to_string(),
            dtype: dtype_name(entry.dtype),
        })?;
        self.decode(entry.offset, dtype, start, dst, scratch)
    }

    /// Reads and decodes elements `start..start + dst.len()` of the tensor of `dtype` whose data
    /// starts at byte `offset` of the file. Reading into an aligned buffer also makes misaligned
    /// data offsets (headers not padded to 8 bytes) harmless.
    pub(crate) fn decode<T: Real>(
        &self,
        offset: u64,
        dtype: FloatDtype,
        start: usize,
        dst: &mut [T],
        scratch: &mut Vec<u64>,
    ) -> Result<()> {
        let raw = self.read_elements(offset, dtype.size(), start, dst.len(), scratch)?;
        dtype.decode(raw, dst);
        Ok(())
    }

    /// Reads `n` elements of `width` bytes from element `start` of the tensor at `offset` into
    /// `scratch` (placed as [`line_matched_bytes`] places it).
    fn read_elements<'s>(
        &self,
        offset: u64,
        width: usize,
        start: usize,
        n: usize,
        scratch: &'s mut Vec<u64>,
    ) -> Result<&'s [u8]> {
        let pos = offset + (start * width) as u64;
        let raw = line_matched_bytes(scratch, n * width, pos, width);
        read_exact_at(&self.file, raw, pos).map_err(|e| {
            Error::io(
                &self.path,
                std::io::Error::new(
                    e.kind(),
                    format!("reading tensor data at byte {offset}: {e}"),
                ),
            )
        })?;
        self.count(raw.len());
        Ok(raw)
    }

    /// [`ModelFile::decode`], and whether every value decoded is finite (see
    /// [`FloatDtype::decode_checked`]).
    pub(crate) fn decode_checked<T: Real>(
        &self,
        offset: u64,
        dtype: FloatDtype,
        start: usize,
        dst: &mut [T],
        scratch: &mut Vec<u64>,
    ) -> Result<bool> {
        let raw = self.read_elements(offset, dtype.size(), start, dst.len(), scratch)?;
        Ok(dtype.decode_checked(raw, dst))
    }

    /// The float dtype most of this file's float elements are stored in, as an output dtype
    /// (FP8 files give f16).
    pub fn main_dtype(&self) -> crate::dtype::OutputDtype {
        use crate::dtype::OutputDtype;
        let mut counts: BTreeMap<&'static str, (usize, OutputDtype)> = BTreeMap::new();
        for t in self.tensors.values() {
            let out = match t.float_dtype() {
                Some(FloatDtype::BF16) => OutputDtype::BF16,
                Some(FloatDtype::F32) => OutputDtype::F32,
                Some(FloatDtype::F64) => OutputDtype::F64,
                Some(_) => OutputDtype::F16,
                None => continue,
            };
            counts.entry(out.name()).or_insert((0, out)).0 += t.numel();
        }
        counts
            .into_values()
            .max_by_key(|(n, _)| *n)
            .map_or(OutputDtype::F16, |(_, d)| d)
    }

    /// The layout detected from this file's keys and shapes (before [`ModelFile::forget_index`]).
    pub fn detected_layout(&self) -> Option<crate::arch::Layout> {
        crate::arch::detect(
            self.tensors
                .iter()
                .map(|(k, t)| (k.as_str(), t.shape.as_slice(), t.numel())),
        )
        .layout
    }

    /// Drops the parsed tensor index (the engine keeps what it needs in its own key table), so
    /// that hundreds of opened inputs do not each hold their header in memory.
    pub(crate) fn forget_index(&mut self) {
        self.tensors = BTreeMap::new();
    }

    /// Copies `dst.len()` raw bytes at absolute byte `offset` of the file.
    pub(crate) fn read_at(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        read_exact_at(&self.file, dst, offset).map_err(|e| Error::io(&self.path, e))?;
        self.count(dst.len());
        Ok(())
    }

    /// Copies `dst.len()` raw bytes of tensor `key` starting at byte `start` within the tensor.
    pub fn read_raw(&self, key: &str, start: u64, dst: &mut [u8]) -> Result<()> {
        let entry = self.tensors.get(key).ok_or_else(|| {
            Error::bad_file(&self.path, format!("tensor `{key}` is not in this file"))
        })?;
        read_exact_at(&self.file, dst, entry.offset + start).map_err(|e| {
            Error::io(
                &self.path,
                std::io::Error::new(e.kind(), format!("reading tensor `{key}`: {e}")),
            )
        })?;
        self.count(dst.len());
        Ok(())
    }
}

/// Why a path cannot be read as a model file (see [`path_problem`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathProblem {
    /// Nothing is there.
    Missing,
    /// A directory.
    Directory,
    /// A FIFO, socket or device; the kind in words ("a FIFO (named pipe)").
    NotRegular(&'static str),
    /// A symbolic link to a path that does not exist (the link's target, as written).
    DanglingSymlink(PathBuf),
    /// The path's metadata cannot be read (e.g. permission denied on a folder).
    Unreadable(String),
}

impl std::fmt::Display for PathProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PathProblem::Missing => f.write_str("does not exist"),
            PathProblem::Directory => f.write_str("is a directory, not a model file"),
            PathProblem::NotRegular(kind) => write!(
                f,
                "is {kind}, not a regular file (models are read only from regular files)"
            ),
            PathProblem::DanglingSymlink(target) => write!(
                f,
                "is a symlink to {}, which does not exist",
                target.display()
            ),
            PathProblem::Unreadable(e) => write!(f, "cannot be examined: {e}"),
        }
    }
}

impl PathProblem {
    fn into_io(self) -> std::io::Error {
        let kind = match self {
            PathProblem::Missing | PathProblem::DanglingSymlink(_) => std::io::ErrorKind::NotFound,
            _ => std::io::ErrorKind::InvalidInput,
        };
        std::io::Error::new(kind, self.to_string())
    }
}

/// Why `path` cannot be opened as a model file: missing, a directory, a FIFO, socket or device,
/// or a symlink whose target does not exist. `None` for a regular file or a symlink to one.
/// The one check behind every "model file" message (the CLI, recipes, [`ModelFile::open`]).
pub fn path_problem(path: &Path) -> Option<PathProblem> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => None,
        Ok(m) if m.is_dir() => Some(PathProblem::Directory),
        Ok(m) => Some(PathProblem::NotRegular(file_kind(&m.file_type()))),
        Err(e) => match std::fs::symlink_metadata(path) {
            Ok(l) if l.file_type().is_symlink() && e.kind() == std::io::ErrorKind::NotFound => {
                let target = std::fs::read_link(path).unwrap_or_default();
                Some(PathProblem::DanglingSymlink(target))
            }
            _ if e.kind() == std::io::ErrorKind::NotFound => Some(PathProblem::Missing),
            _ => Some(PathProblem::Unreadable(e.to_string())),
        },
    }
}

/// A file type in words, for one that is not a regular file.
fn file_kind(t: &std::fs::FileType) -> &'static str {
    if t.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
    }
    "not a regular file"
}

/// A header's tensors (in header order) and `__metadata__`.
type Header = (Vec<(String, TensorInfo)>, BTreeMap<String, String>);

/// Parses and validates a safetensors header: a JSON object without duplicate keys (serde's maps
/// would keep the last silently), each tensor's data a whole number of bytes matching its shape
/// and dtype, and the tensors' data contiguous from byte 0 without gaps or overlaps. Errors name
/// the tensor.
fn parse_header(header: &[u8]) -> std::result::Result<Header, String> {
    let HeaderJson { tensors, metadata } = serde_json::from_slice(header).map_err(|e| {
        let msg = e.to_string();
        if msg.contains("unknown variant") {
            format!("unknown dtype in header: {msg}")
        } else {
            format!("invalid header: {msg}")
        }
    })?;
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| {
        (tensors[a].1.data_offsets, &tensors[a].0).cmp(&(tensors[b].1.data_offsets, &tensors[b].0))
    });
    let mut end = 0usize;
    let mut prev: Option<&str> = None;
    for &i in &order {
        let (name, info) = &tensors[i];
        let (s, e) = info.data_offsets;
        if e < s {
            return Err(format!(
                "invalid header: invalid offset for tensor `{name}`: data_offsets [{s}, {e}] end before they start"
            ));
        }
        if s < end {
            return Err(format!(
                "invalid header: invalid offset for tensor `{name}`: its data [{s}, {e}] overlaps that of `{}`, which ends at byte {end}",
                prev.unwrap_or("")
            ));
        }
        if s > end {
            let after = prev.map_or("the start of the data".to_string(), |p| format!("`{p}`"));
            return Err(format!(
                "invalid header: invalid offset for tensor `{name}`: its data starts at byte {s}, leaving a gap of {} bytes after {after}",
                s - end
            ));
        }
        let bits = info
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .and_then(|n| n.checked_mul(info.dtype.bitsize()));
        let Some(bits) = bits else {
            return Err(format!(
                "invalid header: tensor `{name}`: shape {:?} of {} overflows",
                info.shape, info.dtype
            ));
        };
        if bits % 8 != 0 {
            return Err(format!(
                "invalid header: tensor `{name}`: shape {:?} of {} is not a whole number of bytes",
                info.shape, info.dtype
            ));
        }
        if e - s != bits / 8 {
            return Err(format!(
                "invalid header: tensor `{name}` has shape {:?} of {} ({} bytes) but data_offsets [{s}, {e}] hold {} bytes",
                info.shape,
                info.dtype,
                bits / 8,
                e - s
            ));
        }
        end = e;
        prev = Some(name);
    }
    Ok((tensors, metadata))
}

/// The header's JSON, read in one pass that refuses duplicate keys.
struct HeaderJson {
    tensors: Vec<(String, TensorInfo)>,
    metadata: BTreeMap<String, String>,
}

impl<'de> serde::Deserialize<'de> for HeaderJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = HeaderJson;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object of tensors")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<HeaderJson, A::Error> {
                use serde::de::Error as _;
                let mut seen = std::collections::HashSet::new();
                let mut tensors = Vec::new();
                let mut metadata = BTreeMap::new();
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(A::Error::custom(format!(
                            "duplicate key `{key}` (a header names each tensor once)"
                        )));
                    }
                    if key == "__metadata__" {
                        metadata = map.next_value::<Option<StringMap>>()?.unwrap_or_default().0;
                    } else {
                        // Through a `Value`, so that the error names the tensor once, with the
                        // position of the whole entry.
                        let v: serde_json::Value = map.next_value()?;
                        let info: TensorInfo = serde_json::from_value(v)
                            .map_err(|e| A::Error::custom(format!("tensor `{key}`: {e}")))?;
                        tensors.push((key, info));
                    }
                }
                Ok(HeaderJson { tensors, metadata })
            }
        }
        d.deserialize_map(V)
    }
}

/// A JSON object of strings without duplicate keys (`__metadata__`).
#[derive(Default)]
struct StringMap(BTreeMap<String, String>);

impl<'de> serde::Deserialize<'de> for StringMap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = StringMap;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of strings")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<StringMap, A::Error> {
                use serde::de::Error as _;
                let mut out = BTreeMap::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value: String = map.next_value()?;
                    if out.insert(key.clone(), value).is_some() {
                        return Err(A::Error::custom(format!(
                            "duplicate key `{key}` in __metadata__"
                        )));
                    }
                }
                Ok(StringMap(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Bytes of a cache line.
const LINE: usize = 64;

/// A byte view of `nbytes` bytes of a scratch buffer, for a copy from or to byte `file_pos` of a
/// file, placed at the same offset within a 64-byte cache line as `file_pos` when that keeps it
/// aligned to `align` (a power of two up to 8; else at the buffer's start, 8-byte aligned).
///
/// The kernel copies between the page cache and a process's buffer with `rep movsb`, which on
/// some CPUs (AMD Zen) runs up to 5x slower when the destination is a few bytes past the
/// source within a cache line: reads of page-cache data into a buffer 8-24 bytes past the
/// file's position mod 64 measured 1.6-2.1 s of kernel time for 3.6 GB, against 0.3 s at the
/// same position. Where a malloc'd buffer lands is down to chance, so this made the time of
/// identical runs vary 2x.
pub fn line_matched_bytes(
    scratch: &mut Vec<u64>,
    nbytes: usize,
    file_pos: u64,
    align: usize,
) -> &mut [u8] {
    let words = (nbytes + LINE).div_ceil(8);
    if scratch.len() < words {
        scratch.resize(words, 0);
    }
    let base = scratch.as_ptr() as usize;
    let want = file_pos as usize % LINE;
    let skip = match (want + LINE - base % LINE) % LINE {
        s if s % align.max(1) == 0 => s,
        _ => 0,
    };
    &mut bytemuck::cast_slice_mut::<u64, u8>(scratch)[skip..skip + nbytes]
}

#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, offset)
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "unexpected end of file",
                ))
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_buffers_sit_where_the_file_position_sits_in_a_cache_line() {
        let mut scratch = Vec::new();
        for (pos, align) in [
            (0u64, 2),
            (8, 2),
            (24, 4),
            (4096 + 40, 8),
            (1 << 33, 1),
            (62, 2),
        ] {
            for nbytes in [0, 7, 4096] {
                let b = line_matched_bytes(&mut scratch, nbytes, pos, align);
                assert_eq!(b.len(), nbytes);
                let at = b.as_ptr() as usize;
                assert_eq!(at % LINE, pos as usize % LINE, "pos {pos}, {nbytes} bytes");
                assert_eq!(at % align, 0);
            }
        }
        // Data at an odd position cannot be placed there and stay aligned to its dtype: the
        // buffer's 8-byte-aligned start is used.
        let b = line_matched_bytes(&mut scratch, 10, 65, 2);
        assert_eq!((b.as_ptr() as usize % 8, b.len()), (0, 10));
    }
}
