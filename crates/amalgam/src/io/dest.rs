//! The rules for every file amalgam writes (merge outputs, reports, recipes, synthetic models).
//!
//! All the outputs of one run are checked together by [`check_outputs`] before any tensor is
//! read: the folder exists and is writable; the path is not a directory, not one of the inputs
//! (compared by device and inode, and by canonical path) and not another output of the same run;
//! an existing file is kept unless `force`; and `force` replaces only regular files (never a
//! device such as `/dev/null`, a FIFO, a socket or a symbolic link).
//!
//! Files are written under a temporary name in the destination folder, synced, renamed into
//! place and the folder synced ([`write_atomic`] for small files; `OutputFile`
//! for safetensors files), so a reader never sees a half-written file under the final name. New
//! files get the permissions the umask gives (`0666 & !umask`).

use crate::error::{Error, Result};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The folder a file is written into (`.` for a bare file name).
pub fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn refuse(path: &Path, message: impl Into<String>) -> Error {
    Error::Output {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// The kind of a file that is not a regular file, in words.
fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    }
}

#[cfg(unix)]
fn identity(meta: &std::fs::Metadata) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    Some((meta.dev(), meta.ino()))
}

#[cfg(not(unix))]
fn identity(_meta: &std::fs::Metadata) -> Option<(u64, u64)> {
    None
}

/// The path with its folder made canonical (the file itself need not exist).
fn normalized(path: &Path) -> PathBuf {
    let folder = std::fs::canonicalize(folder_of(path)).unwrap_or_else(|_| folder_of(path));
    match path.file_name() {
        Some(name) => folder.join(name),
        None => folder,
    }
}

/// Checks one output path against the rules (see the module documentation); `inputs` are the
/// files the run reads. Does not check other outputs of the run: [`check_outputs`] does.
pub fn check_output(path: &Path, inputs: &[&Path], force: bool) -> Result<()> {
    check_outputs(&[path], inputs, force)
}

/// A file's device and inode, where the OS gives them.
type FileId = Option<(u64, u64)>;

/// Checks all the outputs of one run together, before anything is read or written.
pub fn check_outputs(outputs: &[&Path], inputs: &[&Path], force: bool) -> Result<()> {
    let input_ids: Vec<(&Path, FileId, PathBuf)> = inputs
        .iter()
        .map(|p| {
            let id = std::fs::metadata(p).ok().and_then(|m| identity(&m));
            let canon = std::fs::canonicalize(p).unwrap_or_else(|_| normalized(p));
            (*p, id, canon)
        })
        .collect();
    let mut seen: Vec<(PathBuf, FileId, &Path)> = Vec::new();
    for &path in outputs {
        if path.as_os_str().is_empty() || path.file_name().is_none() {
            return Err(refuse(path, "is not a file name"));
        }
        let folder = folder_of(path);
        match std::fs::metadata(&folder) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(refuse(
                    path,
                    format!("{} is not a folder", folder.display()),
                ))
            }
            Err(e) => {
                return Err(refuse(
                    path,
                    format!("cannot use the folder {}: {e}", folder.display()),
                ))
            }
        }
        let link = std::fs::symlink_metadata(path).ok();
        let target = std::fs::metadata(path).ok();
        let id = target.as_ref().and_then(identity);
        let canon = std::fs::canonicalize(path).unwrap_or_else(|_| normalized(path));
        if let Some(t) = &target {
            if t.is_dir() {
                return Err(refuse(path, "is a directory"));
            }
        }
        for (input, iid, icanon) in &input_ids {
            if (id.is_some() && id == *iid) || canon == *icanon {
                return Err(refuse(
                    path,
                    format!(
                        "is the input {}; refusing to overwrite an input",
                        input.display()
                    ),
                ));
            }
        }
        for (other, oid, first) in &seen {
            if canon == *other || (id.is_some() && id == *oid) {
                return Err(refuse(
                    path,
                    format!(
                        "is also the output {} of this run; give each output its own path",
                        first.display()
                    ),
                ));
            }
        }
        seen.push((canon, id, path));
        if let Some(l) = &link {
            if !force {
                return Err(refuse(path, "already exists (pass --force to replace it)"));
            }
            if !l.file_type().is_file() {
                let what = match &target {
                    Some(t) if !t.is_file() && l.file_type().is_symlink() => {
                        format!("a symbolic link to {}", kind_of(t))
                    }
                    _ => kind_of(l).to_string(),
                };
                return Err(refuse(
                    path,
                    format!("is {what}; --force replaces only regular files"),
                ));
            }
        }
        check_writable(path, &folder)?;
    }
    Ok(())
}

/// Creates and removes a probe file in `folder`, the one check that holds on every file system
/// and for every user (root included, on a read-only mount).
fn check_writable(path: &Path, folder: &Path) -> Result<()> {
    let probe = temp_name(path, "probe");
    match create_new(&probe) {
        Ok(f) => {
            drop(f);
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(refuse(
            path,
            format!("cannot write into the folder {}: {e}", folder.display()),
        )),
    }
}

/// A hidden name beside `path`, unique to this process and call: `.NAME.PID-N.amalgam-WHAT`.
pub(crate) fn temp_name(path: &Path, what: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    let n = N.fetch_add(1, Ordering::Relaxed);
    folder_of(path).join(format!(".{name}.{}-{n}.amalgam-{what}", std::process::id()))
}

/// Creates a new file (never an existing one) with the permissions the umask gives.
pub(crate) fn create_new(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
}

/// Syncs a folder, so that a rename into it survives a power loss.
pub(crate) fn sync_folder(folder: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        File::open(folder)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = folder;
        Ok(())
    }
}

/// Moves the finished (synced) file `temp` to `dest`: replacing a file there only with `force`,
/// then syncs the folder.
pub(crate) fn place(temp: &Path, dest: &Path, force: bool) -> std::io::Result<()> {
    if force {
        std::fs::rename(temp, dest)?;
    } else {
        // A hard link fails if `dest` exists: no window where another file could be replaced.
        match std::fs::hard_link(temp, dest) {
            Ok(()) => std::fs::remove_file(temp)?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(e),
            // File systems without hard links.
            Err(_) if std::fs::symlink_metadata(dest).is_err() => std::fs::rename(temp, dest)?,
            Err(e) => return Err(e),
        }
    }
    sync_folder(&folder_of(dest))
}

/// Writes a small file by the rules: [`check_output`], then a temporary file in the same folder,
/// synced, renamed into place, folder synced. `inputs` are files it must not replace.
pub fn write_atomic(path: &Path, bytes: &[u8], inputs: &[&Path], force: bool) -> Result<()> {
    check_output(path, inputs, force)?;
    let temp = temp_name(path, "tmp");
    let out = |e: std::io::Error| refuse(path, format!("cannot write: {e}"));
    let result = (|| -> std::io::Result<()> {
        let mut f = create_new(&temp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        place(&temp, path, force)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&temp);
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            return Err(refuse(path, "already exists (pass --force to replace it)"));
        }
        return Err(out(e));
    }
    Ok(())
}
