//! Errors of the domain logic, classified so the extension can map each class
//! to one PostgreSQL SQLSTATE.

use std::fmt;

/// The class of an error; the extension maps each class to one SQLSTATE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The input could not be parsed at all (bad YAML/JSON syntax). SQLSTATE 22P02.
    Syntax,
    /// A value is missing, has the wrong type or is out of range. SQLSTATE 22023.
    InvalidValue,
    /// A name (namespace, step name) is not an acceptable identifier. SQLSTATE 42602.
    InvalidName,
    /// Two objects share a name that must be unique. SQLSTATE 42710.
    Duplicate,
    /// A reference points at something that does not exist. SQLSTATE 42704.
    Undefined,
    /// The definition is structurally impossible (dependency cycle). SQLSTATE 42P17.
    InvalidDefinition,
    /// Valid in tasker-core's format but not supported by pg_tasker. SQLSTATE 0A000.
    Unsupported,
    /// Beyond a documented size limit (steps per template, nesting). SQLSTATE 54000.
    LimitExceeded,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
    pub hint: Option<String>,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            hint: None,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidValue, message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;
