//! The library's error type. Every variant that concerns a file names it.

use std::path::PathBuf;

/// Errors raised by amalgam. Messages name the file, key or recipe line involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing `path` failed. The OS error is in the message, not also a `source`
    /// (printed as a chain, it would show twice).
    #[error("{path}: {error}")]
    Io {
        /// The file read or written.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// `path` is not a valid safetensors file (header, offsets, sizes).
    #[error("{path}: not a valid safetensors file: {reason}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor that would be merged is stored in a dtype amalgam does not read.
    #[error("{path}: tensor `{key}` has dtype {dtype}, which amalgam cannot merge")]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The tensor's key.
        key: String,
        /// Its dtype, as the header names it.
        dtype: String,
    },
    /// Two models store the same key with different shapes.
    #[error(
        "shape mismatch for `{key}`: {first_path} has {first_shape:?} but {second_path} has {second_shape:?}"
    )]
    ShapeMismatch {
        /// The key.
        key: String,
        /// The first model with the key.
        first_path: PathBuf,
        /// Its shape there.
        first_shape: Vec<usize>,
        /// The model whose shape differs.
        second_path: PathBuf,
        /// Its shape there.
        second_shape: Vec<usize>,
    },
    /// A recipe (TOML or `.mecha`) is invalid.
    #[error("recipe {origin}: {message}")]
    Recipe {
        /// The recipe file and line (or the command line).
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// The output cannot be written as asked (it exists, its folder is missing, ...).
    #[error("output {path}: {message}")]
    Output {
        /// The output file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A method's parameters or inputs are invalid.
    #[error("method `{method}`: {message}")]
    Method {
        /// The method's name.
        method: String,
        /// What is wrong.
        message: String,
    },
    /// Any other invalid request; the message says what and where.
    #[error("{0}")]
    Invalid(String),
    /// A model's tensor holds NaN or Inf values and the policy is `error`.
    #[error(
        "{path}: tensor `{key}` holds {count} NaN/Inf values (--non-finite error); `--non-finite omit` leaves the model out of that key"
    )]
    NonFinite {
        /// The model file.
        path: PathBuf,
        /// The tensor's key.
        key: String,
        /// How many of its values are NaN or ±Inf.
        count: u64,
    },
    /// The merge was stopped through its [`crate::Cancel`] token; no output was written.
    #[error("cancelled; no output was written")]
    Cancelled,
}

/// A result with amalgam's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error: source,
        }
    }
    pub(crate) fn bad_file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::BadFile {
            path: path.into(),
            reason: reason.into(),
        }
    }
    pub(crate) fn method(method: &str, message: impl Into<String>) -> Self {
        Error::Method {
            method: method.to_string(),
            message: message.into(),
        }
    }
}
