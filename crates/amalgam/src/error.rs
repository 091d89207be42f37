//! The library's error type. Every variant that concerns a file names it.

use std::path::PathBuf;

/// Errors raised by amalgam. Messages name the file, key or recipe line involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The OS error is in the message, not also a `source` (printed as a chain, it would show
    /// twice).
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("{path}: tensor `{key}` has dtype {dtype}, which amalgam cannot merge")]
    UnsupportedDtype {
        path: PathBuf,
        key: String,
        dtype: String,
    },
    #[error(
        "shape mismatch for `{key}`: {first_path} has {first_shape:?} but {second_path} has {second_shape:?}"
    )]
    ShapeMismatch {
        key: String,
        first_path: PathBuf,
        first_shape: Vec<usize>,
        second_path: PathBuf,
        second_shape: Vec<usize>,
    },
    #[error("recipe {origin}: {message}")]
    Recipe { origin: String, message: String },
    #[error("output {path}: {message}")]
    Output { path: PathBuf, message: String },
    #[error("method `{method}`: {message}")]
    Method { method: String, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error(
        "{path}: tensor `{key}` holds {count} NaN/Inf values (--non-finite error); `--non-finite omit` leaves the model out of that key"
    )]
    NonFinite {
        path: PathBuf,
        key: String,
        count: u64,
    },
    /// The merge was stopped through its [`crate::Cancel`] token; no output was written.
    #[error("cancelled; no output was written")]
    Cancelled,
}

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
