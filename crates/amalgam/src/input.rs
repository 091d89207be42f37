//! Reading safetensors inputs lazily: the header is parsed and validated up front; tensor data is
//! memory-mapped (read-only) and decoded straight from the page cache into the compute type, with
//! no intermediate copy. After a chunk is merged the engine hands its pages back to the kernel
//! ([`ModelFile::release`]), so the process's resident memory stays bounded by the working set,
//! whatever the number and size of the inputs.
//!
//! Inputs must not be modified while a merge reads them (a truncated mapped file faults).

use crate::dtype::{dtype_name, FloatDtype};
use crate::error::{Error, Result};
use crate::real::Real;
use memmap2::Mmap;
use safetensors::tensor::Metadata;
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
    map: Mmap,
    size: u64,
    tensors: BTreeMap<String, TensorEntry>,
    metadata: BTreeMap<String, String>,
}

/// The largest header amalgam accepts (the safetensors limit).
const MAX_HEADER: u64 = 100_000_000;

impl ModelFile {
    /// Opens `path` and validates its header: length, JSON, dtypes, contiguous in-range offsets, and
    /// that the data section ends exactly at the end of the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let size = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if size < 8 {
            return Err(Error::bad_file(
                &path,
                format!("file is {size} bytes, shorter than the 8-byte header length"),
            ));
        }
        // SAFETY: the map is read-only; inputs are documented as immutable during a merge.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        #[cfg(unix)]
        let _ = map.advise(memmap2::Advice::Sequential);
        let header_len = u64::from_le_bytes(map[..8].try_into().expect("8 bytes"));
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
        let header = &map[8..8 + header_len as usize];
        let meta: Metadata = serde_json::from_slice(header).map_err(|e| {
            let msg = e.to_string();
            if msg.contains("unknown variant") {
                Error::bad_file(&path, format!("unknown dtype in header: {msg}"))
            } else {
                Error::bad_file(&path, format!("invalid header: {msg}"))
            }
        })?;
        let data_start = 8 + header_len;
        let data_len = meta.data_len() as u64;
        if data_start + data_len > size {
            return Err(Error::bad_file(
                &path,
                format!(
                    "truncated: the header describes {} bytes of tensor data but only {} follow it",
                    data_len,
                    size - data_start
                ),
            ));
        }
        if data_start + data_len < size {
            return Err(Error::bad_file(
                &path,
                format!(
                    "{} bytes after the last tensor's data: the header does not cover the file",
                    size - data_start - data_len
                ),
            ));
        }
        let mut tensors = BTreeMap::new();
        for (name, info) in meta.tensors() {
            let (s, e) = info.data_offsets;
            tensors.insert(
                name,
                TensorEntry {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    offset: data_start + s as u64,
                    len: (e - s) as u64,
                },
            );
        }
        let metadata = meta
            .metadata()
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        Ok(ModelFile {
            path,
            map,
            size,
            tensors,
            metadata,
        })
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
        self.decode(entry.offset, dtype, start, dst, scratch);
        Ok(())
    }

    /// Decodes elements `start..start + dst.len()` of the tensor of `dtype` whose data starts at
    /// byte `offset` of the file (offsets come from a validated header, so they are in range).
    pub(crate) fn decode<T: Real>(
        &self,
        offset: u64,
        dtype: FloatDtype,
        start: usize,
        dst: &mut [T],
        scratch: &mut Vec<u64>,
    ) {
        let width = dtype.size();
        let at = offset as usize + start * width;
        let bytes = &self.map[at..at + dst.len() * width];
        if (bytes.as_ptr() as usize) % width == 0 {
            dtype.decode(bytes, dst);
        } else {
            // Misaligned data offset (some writers do not pad the header): copy to aligned memory.
            let aligned = aligned_bytes(scratch, bytes.len());
            aligned.copy_from_slice(bytes);
            dtype.decode(aligned, dst);
        }
    }

    /// Tells the kernel this process no longer needs the pages of bytes `at..at + len` (they stay
    /// in the page cache), so they stop counting towards resident memory.
    pub(crate) fn release(&self, at: u64, len: u64) {
        #[cfg(unix)]
        if len > 0 {
            // SAFETY: the map is private and read-only; dropped pages are re-read from the file
            // if touched again, so no data can change or be lost.
            let _ = unsafe {
                self.map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    at as usize,
                    len as usize,
                )
            };
        }
        #[cfg(not(unix))]
        let _ = (at, len);
    }

    /// Copies `dst.len()` raw bytes of tensor `key` starting at byte `start` within the tensor.
    pub fn read_raw(&self, key: &str, start: u64, dst: &mut [u8]) -> Result<()> {
        let entry = self.tensors.get(key).ok_or_else(|| {
            Error::bad_file(&self.path, format!("tensor `{key}` is not in this file"))
        })?;
        let at = (entry.offset + start) as usize;
        dst.copy_from_slice(&self.map[at..at + dst.len()]);
        Ok(())
    }
}

/// A byte view of `nbytes` bytes at the start of an 8-byte-aligned scratch buffer.
pub(crate) fn aligned_bytes(scratch: &mut Vec<u64>, nbytes: usize) -> &mut [u8] {
    let words = nbytes.div_ceil(8);
    if scratch.len() < words {
        scratch.resize(words, 0);
    }
    &mut bytemuck::cast_slice_mut::<u64, u8>(&mut scratch[..words])[..nbytes]
}
