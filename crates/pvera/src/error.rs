//! The library's one error type.
//!
//! Every variant carries what a user needs to fix the problem: the file or key involved, what was
//! expected, what was found. Messages follow PEFT's wording where PEFT has a message for the same
//! situation, so users searching for a PEFT error find the same cause.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `pvera`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
#[allow(missing_docs)] // variant fields are named for what they hold
pub enum Error {
    /// A configuration value is invalid (`r <= 0`, unknown `bias`, ...).
    #[error("invalid adapter config: `{field}`: {reason}")]
    InvalidConfig { field: String, reason: String },

    /// A JSON document could not be parsed (malformed, truncated, or a field of the wrong type).
    #[error("cannot parse {path}: {reason}")]
    ConfigParse { path: String, reason: String },

    /// The config is for another PEFT method.
    #[error(
        "{path}: `peft_type` is {found:?}, expected \"PVERA\" or \"VERA\"; this adapter was written for another \
         PEFT method and cannot be loaded as PVeRA or VeRA"
    )]
    WrongPeftType { path: String, found: String },

    /// No registered linear layer matched the target patterns.
    #[error(
        "No layers types compatible with {method} were found. Please check `peft_config.target_modules`: \
         {patterns} matched none of the model's linear layers. Known linear layers: {known}"
    )]
    NoTargetMatched { method: crate::method::Method, patterns: String, known: String },

    /// The model type has no default target modules and none were given.
    #[error(
        "Please specify `target_modules` in `peft_config`: model type {model_type:?} has no default {method} \
         targets (PEFT's table has none either)"
    )]
    NoDefaultTargets { method: crate::method::Method, model_type: String },

    /// A tensor expected in a checkpoint or input file is absent.
    #[error("{file}: missing tensor `{key}`{hint}")]
    MissingTensor { file: String, key: String, hint: String },

    /// A tensor has the wrong shape.
    #[error("{file}: tensor `{key}` has shape {got:?}, expected {expected}{hint}")]
    ShapeMismatch {
        file: String,
        key: String,
        expected: String,
        got: Vec<usize>,
        hint: String,
    },

    /// A tensor has an unsupported dtype.
    #[error("{file}: tensor `{key}` has dtype {got}, expected one of {expected}")]
    DtypeMismatch { file: String, key: String, got: String, expected: String },

    /// A tensor holds NaN or infinite values where finite ones are required.
    #[error("{what}: {count} non-finite value(s) (NaN or Inf){hint}")]
    NonFinite { what: String, count: usize, hint: String },

    /// A safetensors file is malformed (bad header, offsets past the end, ...).
    #[error("{file}: not a valid safetensors file: {reason}")]
    Safetensors { file: String, reason: String },

    /// An adapter operation is not allowed in the current state (PEFT's ValueErrors).
    #[error("{0}")]
    Adapter(String),

    /// An adapter name that does not exist.
    #[error("adapter {name:?} does not exist; known adapters: {known}")]
    UnknownAdapter { name: String, known: String },

    /// Projection matrices are incompatible with a layer or a later adapter.
    #[error("{0}")]
    Projection(String),

    /// A file system operation failed. The message already carries the I/O error's text, so it
    /// is not also reported as the error's `source()` (a chain printer such as anyhow's `{:#}`
    /// would repeat it: "No such file or directory (os error 2): No such file or directory").
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },

    /// An error from candle's tensor library (its text is in the message, not repeated as the
    /// error's `source()`, for the reason given at [`Error::Io`]).
    #[error("tensor operation failed: {0}")]
    Candle(candle_core::Error),

    /// A model definition problem (unknown module, unsupported layer kind, ...).
    #[error("{0}")]
    Model(String),

    /// An adapter file holds tensors for modules this model does not have or adapt (an adapter
    /// for another model family or module naming scheme).
    #[error("{file}: {count} λ tensor(s) belong to modules this model does not adapt: {keys}{hint}")]
    UnexpectedTensors { file: String, count: usize, keys: String, hint: String },

    /// A model directory this library cannot build (unknown or unsupported `model_type`, or an
    /// architecture variant not implemented).
    #[error("{path}: {reason}")]
    UnsupportedModel { path: String, reason: String },

    /// A data set file or one of its records cannot be used (unreadable image, empty text,
    /// unknown label, bad split request, ...). The message names the file, the record and the fix.
    #[error("{0}")]
    Data(String),

    /// A request that does not fit the model, the adapter or itself: label names that do not
    /// match the trained head, a pooling the model cannot do, a text longer than the model's
    /// positions, an unknown adapter name in a prediction request, ... The message names the
    /// value, what was expected and the fix. (CLI exit 2; a server answers 4xx.)
    #[error("{0}")]
    Request(String),

    /// `calibration.json` belongs to another adapter: the adapter's files changed after
    /// `pvera calibrate` fitted it, so its temperature and conformal thresholds no longer hold.
    #[error(
        "{path}: fitted for adapter {file_hash} but the adapter in that folder now hashes to {adapter_hash} (its \
         adapter_config.json or adapter_model.safetensors changed after calibration), so the temperature and the \
         conformal thresholds no longer hold. Re-run `pvera calibrate` for this adapter, or turn calibration off \
         (`--no-calibration`)"
    )]
    StaleCalibration { path: PathBuf, file_hash: String, adapter_hash: String },
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e)
    }
}

impl Error {
    /// Helper for I/O errors that always names the path.
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io { path: path.into(), error }
    }

    /// Helper for config validation errors.
    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidConfig { field: field.into(), reason: reason.into() }
    }
}
