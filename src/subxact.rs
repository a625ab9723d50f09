//! Running a closure inside a subtransaction, so that an error in it rolls
//! back only its own work (as a PL/pgSQL `BEGIN ... EXCEPTION` block does).

use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::PgTryBuilder;

use crate::errors::ApiResult;

enum Ended<R> {
    /// The closure returned (Ok or Err); the subtransaction is still open.
    Returned(ApiResult<R>),
    /// An error was raised; the catch handler already rolled back.
    Raised(String),
}

/// Runs `f` in a subtransaction. On `Ok` the subtransaction is released; on
/// `Err`, or on an error raised inside, it is rolled back and the error is
/// returned as text. The surrounding transaction stays usable either way.
pub fn run<R>(f: impl FnOnce() -> ApiResult<R> + std::panic::UnwindSafe) -> Result<R, String> {
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

        let ended = PgTryBuilder::new(move || Ended::Returned(f()))
            .catch_others(|cause| {
                let message = match &cause {
                    CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => {
                        format!("{} (SQLSTATE {:?})", r.message(), r.sql_error_code())
                    }
                    CaughtError::RustPanic { ereport, .. } => ereport.message().to_string(),
                };
                pg_sys::FlushErrorState();
                pg_sys::RollbackAndReleaseCurrentSubTransaction();
                restore();
                Ended::Raised(message)
            })
            .execute();

        match ended {
            Ended::Returned(Ok(v)) => {
                pg_sys::ReleaseCurrentSubTransaction();
                restore();
                Ok(v)
            }
            Ended::Returned(Err(report)) => {
                pg_sys::RollbackAndReleaseCurrentSubTransaction();
                restore();
                Err(report.message().to_string())
            }
            Ended::Raised(message) => Err(message),
        }
    }
}
