//! Writing the merged safetensors file incrementally.
//!
//! The header is fixed before any data is computed (every output key, dtype and shape is known from
//! the plan), so tensor data can be written at known offsets, in any order, a chunk at a time. The
//! file is written under a temporary name in the destination folder and renamed into place only by
//! [`OutputFile::commit`]; dropping an uncommitted `OutputFile` deletes the temporary file.

use crate::error::{Error, Result};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// One tensor to be written.
#[derive(Clone, Debug)]
pub struct OutputTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

/// An output file being written.
pub struct OutputFile {
    dest: PathBuf,
    temp: Option<tempfile::NamedTempFile>,
    /// Absolute byte offset of each tensor's data, in the order given to [`OutputFile::create`].
    offsets: Vec<u64>,
    overwrite: bool,
    /// Held while writing: one write at a time. Concurrent writes to one file contend on its
    /// inode lock in the kernel, where the waiting thread spins: two workers writing at once
    /// spent 3x the kernel time of one. Waiting here sleeps instead.
    writing: std::sync::Mutex<()>,
}

impl OutputFile {
    /// Creates the temporary file and writes the header. Tensors are laid out in the order given
    /// (callers pass them sorted by name, so the output is deterministic).
    pub fn create(
        dest: &Path,
        tensors: &[OutputTensor],
        metadata: HashMap<String, String>,
        overwrite: bool,
    ) -> Result<Self> {
        if dest.exists() && !overwrite {
            return Err(Error::Output {
                path: dest.to_path_buf(),
                message: "already exists (pass --force to replace it)".into(),
            });
        }
        // The header is built as a JSON map with sorted keys (the `__metadata__` map of the
        // safetensors crate is a HashMap whose order changes between runs), then validated by
        // parsing it back with the crate's own `Metadata` type.
        let mut root = serde_json::Map::new();
        let sorted: std::collections::BTreeMap<_, _> = metadata.into_iter().collect();
        root.insert(
            "__metadata__".into(),
            serde_json::to_value(sorted).expect("string map"),
        );
        let mut pos = 0usize;
        for t in tensors {
            let numel: usize = t.shape.iter().product();
            let len = numel * t.dtype.bitsize() / 8;
            let info = TensorInfo {
                dtype: t.dtype,
                shape: t.shape.clone(),
                data_offsets: (pos, pos + len),
            };
            if root
                .insert(
                    t.name.clone(),
                    serde_json::to_value(&info).expect("tensor info"),
                )
                .is_some()
            {
                return Err(Error::Output {
                    path: dest.to_path_buf(),
                    message: format!("tensor `{}` listed twice", t.name),
                });
            }
            pos += len;
        }
        let data_len = pos as u64;
        let mut header = serde_json::to_vec(&root).map_err(|e| Error::Output {
            path: dest.to_path_buf(),
            message: format!("cannot encode header: {e}"),
        })?;
        let meta: Metadata = serde_json::from_slice(&header).map_err(|e| Error::Output {
            path: dest.to_path_buf(),
            message: format!("invalid header: {e}"),
        })?;
        debug_assert_eq!(meta.data_len() as u64, data_len);
        // Pad with spaces so tensor data starts 8-byte aligned, as the reference writers do.
        while header.len() % 8 != 0 {
            header.push(b' ');
        }
        let data_start = 8 + header.len() as u64;
        let mut offsets = Vec::with_capacity(tensors.len());
        let mut at = data_start;
        for t in tensors {
            offsets.push(at);
            let numel: usize = t.shape.iter().product();
            at += (numel * t.dtype.bitsize() / 8) as u64;
        }

        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "output".into());
        let temp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".amalgam-partial")
            .tempfile_in(&dir)
            .map_err(|e| Error::io(&dir, e))?;
        let file = temp.as_file();
        let io = |e| Error::io(temp.path(), e);
        file.set_len(data_start + data_len).map_err(io)?;
        write_all_at(file, &(header.len() as u64).to_le_bytes(), 0).map_err(io)?;
        write_all_at(file, &header, 8).map_err(io)?;
        Ok(OutputFile {
            dest: dest.to_path_buf(),
            temp: Some(temp),
            offsets,
            overwrite,
            writing: std::sync::Mutex::new(()),
        })
    }

    /// The position in the file of byte `start` of tensor `index`'s data.
    pub fn file_pos(&self, index: usize, start: u64) -> u64 {
        self.offsets[index] + start
    }

    /// Writes `bytes` into tensor number `index` (in creation order) at byte `start` of its data.
    pub fn write_at(&self, index: usize, start: u64, bytes: &[u8]) -> Result<()> {
        let temp = self.temp.as_ref().expect("output already committed");
        let _one = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        write_all_at(temp.as_file(), bytes, self.offsets[index] + start)
            .map_err(|e| Error::io(temp.path(), e))
    }

    /// The file being written (its temporary name).
    pub fn temp_path(&self) -> &Path {
        self.temp.as_ref().expect("output already committed").path()
    }

    /// Renames the finished file into place.
    pub fn commit(mut self) -> Result<PathBuf> {
        let temp = self.temp.take().expect("output already committed");
        let result = if self.overwrite {
            temp.persist(&self.dest).map(|_| ())
        } else {
            temp.persist_noclobber(&self.dest).map(|_| ())
        };
        result.map_err(|e| Error::Output {
            path: self.dest.clone(),
            message: format!("cannot move the finished file into place: {}", e.error),
        })?;
        Ok(self.dest.clone())
    }
}

#[cfg(unix)]
fn write_all_at(file: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(buf, offset)
}

#[cfg(windows)]
fn write_all_at(file: &File, mut buf: &[u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        let n = file.seek_write(buf, offset)?;
        buf = &buf[n..];
        offset += n as u64;
    }
    Ok(())
}
