//! What a path given as a model is, when it cannot be read as one (missing, a folder, a FIFO, a
//! dangling link): checked before it is opened.

use super::*;

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
    pub(super) fn into_io(self) -> std::io::Error {
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
pub(super) fn file_kind(t: &std::fs::FileType) -> &'static str {
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
