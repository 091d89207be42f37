//! Writing the merged safetensors file incrementally.
//!
//! The header is fixed before any data is computed (every output key, dtype and shape is known from
//! the plan), so tensor data can be written at known offsets, in any order, a chunk at a time. The
//! file is written under a hidden name in the destination folder, synced and renamed into place
//! only by [`OutputFile::commit`]; dropping an uncommitted `OutputFile` deletes the hidden file
//! (unless told to keep it for a resume, see [`crate::resume`]).

use crate::error::{Error, Result};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// One tensor to be written.
#[derive(Clone, Debug)]
pub struct OutputTensor {
    /// The key.
    pub name: String,
    /// The dtype written.
    pub dtype: Dtype,
    /// The shape.
    pub shape: Vec<usize>,
}

/// An output file being written.
pub struct OutputFile {
    dest: PathBuf,
    /// The file being written: a hidden name beside `dest`.
    temp: PathBuf,
    file: Option<File>,
    /// The length prefix and the header, as written at the start of the file.
    header: Vec<u8>,
    /// Absolute byte offset of each tensor's data, in the order given to [`OutputFile::create`].
    offsets: Vec<u64>,
    /// Byte length of each tensor's data.
    lens: Vec<u64>,
    overwrite: bool,
    /// Keep the temporary file when dropped uncommitted (for a later resume).
    keep: bool,
    /// Held while writing: one write at a time. Concurrent writes to one file contend on its
    /// inode lock in the kernel, where the waiting thread spins: two workers writing at once
    /// spent 3x the kernel time of one. Waiting here sleeps instead.
    writing: std::sync::Mutex<()>,
}

/// The header of an output: the length prefix and header bytes, each tensor's absolute offset
/// and byte length.
pub(crate) struct HeaderLayout {
    pub header: Vec<u8>,
    pub offsets: Vec<u64>,
    pub lens: Vec<u64>,
}

impl HeaderLayout {
    /// The size of the whole file.
    pub fn file_len(&self) -> u64 {
        self.header.len() as u64 + self.lens.iter().sum::<u64>()
    }
}

/// Builds the header of an output with these tensors, in this order.
pub(crate) fn layout(
    dest: &Path,
    tensors: &[OutputTensor],
    metadata: HashMap<String, String>,
) -> Result<HeaderLayout> {
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
    let mut lens = Vec::with_capacity(tensors.len());
    let mut at = data_start;
    for t in tensors {
        offsets.push(at);
        let numel: usize = t.shape.iter().product();
        let len = (numel * t.dtype.bitsize() / 8) as u64;
        lens.push(len);
        at += len;
    }
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    Ok(HeaderLayout {
        header: bytes,
        offsets,
        lens,
    })
}

/// An output error naming the destination (not the temporary file).
pub(crate) fn out_err(dest: &Path, what: &str, e: std::io::Error) -> Error {
    Error::Output {
        path: dest.to_path_buf(),
        message: format!("{what}: {e}"),
    }
}

impl OutputFile {
    /// Checks `dest` by the rules of [`crate::io::dest`], creates the temporary file and writes the
    /// header. Tensors are laid out in the order given (callers pass them sorted by name, so the
    /// output is deterministic).
    pub fn create(
        dest: &Path,
        tensors: &[OutputTensor],
        metadata: HashMap<String, String>,
        overwrite: bool,
    ) -> Result<Self> {
        crate::io::dest::check_output(dest, &[], overwrite)?;
        let layout = layout(dest, tensors, metadata)?;
        let temp = crate::io::dest::temp_name(dest, "partial");
        let file = crate::io::dest::create_new(&temp)
            .map_err(|e| out_err(dest, "cannot create the file", e))?;
        let out = OutputFile::from_parts(dest, temp, file, layout, overwrite);
        out.start()?;
        Ok(out)
    }

    /// An output written into `file` (at `temp`), which has the right size and header already
    /// or is then given them by [`OutputFile::start`].
    pub(crate) fn from_parts(
        dest: &Path,
        temp: PathBuf,
        file: File,
        layout: HeaderLayout,
        overwrite: bool,
    ) -> Self {
        OutputFile {
            dest: dest.to_path_buf(),
            temp,
            file: Some(file),
            header: layout.header,
            offsets: layout.offsets,
            lens: layout.lens,
            overwrite,
            keep: false,
            writing: std::sync::Mutex::new(()),
        }
    }

    /// Sizes the file and writes the header.
    pub(crate) fn start(&self) -> Result<()> {
        let file = self.file();
        let len = self.header.len() as u64 + self.lens.iter().sum::<u64>();
        let io = |e| out_err(&self.dest, "cannot write", e);
        file.set_len(0).map_err(io)?;
        file.set_len(len).map_err(io)?;
        write_all_at(file, &self.header, 0).map_err(io)
    }

    pub(crate) fn file(&self) -> &File {
        self.file.as_ref().expect("output already committed")
    }

    /// The file positions of tensor `index`'s data.
    pub fn tensor_range(&self, index: usize) -> std::ops::Range<u64> {
        self.offsets[index]..self.offsets[index] + self.lens[index]
    }

    /// Keep the temporary file if this is dropped uncommitted (to resume later).
    pub fn keep_on_drop(&mut self, keep: bool) {
        self.keep = keep;
    }

    /// The position in the file of byte `start` of tensor `index`'s data.
    pub fn file_pos(&self, index: usize, start: u64) -> u64 {
        self.offsets[index] + start
    }

    /// Writes `bytes` into tensor number `index` (in creation order) at byte `start` of its data.
    pub fn write_at(&self, index: usize, start: u64, bytes: &[u8]) -> Result<()> {
        let file = self.file();
        let _one = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        write_all_at(file, bytes, self.offsets[index] + start)
            .map_err(|e| out_err(&self.dest, "cannot write", e))
    }

    /// Syncs the finished file, renames it into place and syncs the folder.
    pub fn commit(mut self) -> Result<PathBuf> {
        let file = self.file.take().expect("output already committed");
        let result = file.sync_all().and_then(|()| {
            drop(file);
            crate::io::dest::place(&self.temp, &self.dest, self.overwrite)
        });
        if let Err(e) = result {
            let _ = std::fs::remove_file(&self.temp);
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                return Err(Error::Output {
                    path: self.dest.clone(),
                    message: "already exists (pass --force to replace it)".into(),
                });
            }
            return Err(out_err(
                &self.dest,
                "cannot move the finished file into place",
                e,
            ));
        }
        Ok(self.dest.clone())
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        if self.file.take().is_some() && !self.keep {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Reads exactly `buf.len()` bytes at `offset`.
#[cfg(unix)]
pub(crate) fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, offset)
}

#[cfg(windows)]
pub(crate) fn read_exact_at(
    file: &File,
    mut buf: &mut [u8],
    mut offset: u64,
) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        let n = file.seek_read(buf, offset)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf = &mut buf[n..];
        offset += n as u64;
    }
    Ok(())
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
