//! Running a closure inside a subtransaction, so that an error in it rolls
//! back only its own work (as a PL/pgSQL `BEGIN ... EXCEPTION` block does).

use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::{PgLogLevel, PgTryBuilder};

use crate::errors::ApiResult;

/// An error caught in a subtransaction.
#[derive(Debug, Clone)]
pub struct Failed {
    pub message: String,
    pub sqlstate: String,
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.sqlstate)
    }
}

/// The five-character SQLSTATE of a packed error code.
fn sqlstate_text(code: pgrx::PgSqlErrorCode) -> String {
    let v = code as i32;
    (0..5)
        .map(|i| (((v >> (6 * i)) & 0x3F) as u8 + b'0') as char)
        .collect()
}

/// Runs `f` in a subtransaction. On `Ok` the subtransaction is released; on
/// `Err`, or on an error raised inside, it is rolled back and the error is
/// returned with its SQLSTATE. The surrounding transaction stays usable.
pub fn run<R>(f: impl FnOnce() -> ApiResult<R> + std::panic::UnwindSafe) -> Result<R, Failed> {
    // SAFETY: the PL/pgSQL sequence: remember context and resource owner,
    // start the subtransaction, switch back to the caller's context; on the
    // way out release or roll back, then restore both.
    unsafe {
        let ctx = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        let restore = || {
            pg_sys::MemoryContextSwitchTo(ctx);
            pg_sys::CurrentResourceOwner = owner;
        };
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(ctx);

        let outcome = PgTryBuilder::new(move || match f() {
            Ok(v) => Ok(v),
            // raise it, so that it is caught below with its SQLSTATE
            Err(report) => {
                report.report(PgLogLevel::ERROR);
                unreachable!("ERROR does not return")
            }
        })
        .catch_others(|cause| {
            let failed = match &cause {
                CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => Failed {
                    message: r.message().to_string(),
                    sqlstate: sqlstate_text(r.sql_error_code()),
                },
                CaughtError::RustPanic { ereport, .. } => Failed {
                    message: ereport.message().to_string(),
                    sqlstate: "XX000".into(),
                },
            };
            pg_sys::FlushErrorState();
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
            restore();
            Err(failed)
        })
        .execute();

        if outcome.is_ok() {
            pg_sys::ReleaseCurrentSubTransaction();
            restore();
        }
        outcome
    }
}
