//! Errors as PostgreSQL sees them: every user-caused error carries a specific
//! SQLSTATE (never the 22000 / XX000 a plain string error would become).

use pg_tasker_core::{Error, ErrorKind};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::PgSqlErrorCode;

pub type ApiResult<T> = Result<T, ErrorReport>;

/// An error with an explicit SQLSTATE.
pub fn err(code: PgSqlErrorCode, message: impl Into<String>) -> ErrorReport {
    ErrorReport::new(code, message.into(), "pg_tasker")
}

pub fn invalid(message: impl Into<String>) -> ErrorReport {
    err(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, message)
}

pub fn null_arg(name: &str) -> ErrorReport {
    err(
        PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
        format!("{name} must not be NULL"),
    )
}

/// A failure inside pg_tasker itself (SPI misuse, unreadable stored data).
pub fn internal(e: impl std::fmt::Display) -> ErrorReport {
    err(
        PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        format!("pg_tasker internal error: {e}"),
    )
}

/// Maps a domain error to its SQLSTATE (see docs/sql-api.md, "Errors").
pub fn from_core(e: Error) -> ErrorReport {
    let code = match e.kind {
        ErrorKind::Syntax => PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION,
        ErrorKind::InvalidValue => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        ErrorKind::InvalidName => PgSqlErrorCode::ERRCODE_INVALID_NAME,
        ErrorKind::Duplicate => PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
        ErrorKind::Undefined => PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
        ErrorKind::InvalidDefinition => PgSqlErrorCode::ERRCODE_INVALID_OBJECT_DEFINITION,
        ErrorKind::Unsupported => PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
        ErrorKind::LimitExceeded => PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
    };
    let report = err(code, e.message);
    match e.hint {
        Some(h) => report.set_hint(h),
        None => report,
    }
}
