//! Reading safetensors inputs lazily: the header is parsed and validated up front; tensor data is
//! read on demand with positioned reads (`pread`) of one cache-sized chunk at a time into a reused
//! aligned buffer, then decoded into the compute type. Nothing is memory-mapped, so the process's
//! resident memory is exactly the engine's buffers, whatever the number and size of the inputs
//! (a mapping would count every page read as resident until unmapped), and an input truncated
//! during a merge is an I/O error, not a crash.

mod header;
mod path;

use header::*;
use path::*;
pub use path::{path_problem, PathProblem};

use crate::error::{Error, Result};
use crate::io::dtype::{dtype_name, FloatDtype};
use crate::real::Real;
use safetensors::tensor::TensorInfo;
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Header facts about one tensor of an input file.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    /// The stored dtype.
    pub dtype: Dtype,
    /// The shape.
    pub shape: Vec<usize>,
    /// Absolute byte offset of the tensor's data in the file.
    pub offset: u64,
    /// Length of the tensor's data in bytes.
    pub len: u64,
}

impl TensorEntry {
    /// The number of elements.
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
    /// The buffer, for another read.
    pub(crate) fn into_words(self) -> Vec<u64> {
        self.words
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
    /// `words` is a buffer to reuse (see [`RawTensor::into_words`]): fresh memory costs a page
    /// fault per page, on some virtual machines a host fault.
    pub(crate) fn read_whole(
        &self,
        offset: u64,
        len: usize,
        width: usize,
        mut words: Vec<u64>,
    ) -> Result<RawTensor> {
        let buf = line_matched_bytes(&mut words, len, offset, width);
        let at = buf.as_ptr() as usize;
        read_exact_at(&self.file, buf, offset).map_err(|e| Error::io(&self.path, e))?;
        self.count(len);
        let skip = at - words.as_ptr() as usize;
        Ok(RawTensor { words, skip, len })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The file's size in bytes.
    pub fn file_size(&self) -> u64 {
        self.size
    }
    /// Tensors by name, in name order.
    pub fn tensors(&self) -> &BTreeMap<String, TensorEntry> {
        &self.tensors
    }
    /// The header entry of `key`, if the file has it.
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

    /// Float tensor `key` whole, converted to `T` (an error naming the file and the key when it
    /// is absent or not a float tensor).
    pub fn read_tensor<T: Real>(&self, key: &str) -> Result<Vec<T>> {
        let n = self.tensor(key).map_or(0, |t| t.numel());
        let mut out = vec![T::ZERO; n];
        self.read_chunk(key, 0, &mut out, &mut Vec::new())?;
        Ok(out)
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
    pub fn main_dtype(&self) -> crate::io::dtype::OutputDtype {
        use crate::io::dtype::OutputDtype;
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

    /// The layout detected from this file's keys and shapes (before its index is forgotten).
    pub fn detected_layout(&self) -> Option<crate::layout::arch::Layout> {
        crate::layout::arch::detect(
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
