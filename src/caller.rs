//! Who is calling, and what it holds everywhere: the fast half of the
//! namespace privilege checks of `sql/03_privileges.sql` (the rule is
//! pg_tasker_core::privilege).

use pg_tasker_core::privilege::Need;
use pgrx::prelude::*;

use crate::errors::{internal, ApiResult};

fn need(p: &str) -> ApiResult<Need> {
    Need::parse(p).ok_or_else(|| internal(format!("unknown privilege \"{p}\"")))
}

/// 42501 inside a security-restricted operation (an index expression, a
/// maintenance command, a materialized view refresh): there the session's
/// role is not the one whose code runs (a superuser's ANALYZE runs a table
/// owner's functions), so it must not count as the caller.
fn unrestricted() -> ApiResult<()> {
    // SAFETY: reads a backend-local flag.
    if unsafe { pg_sys::InSecurityRestrictedOperation() } {
        return Err(crate::errors::err(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "pg_tasker functions cannot run inside a security-restricted operation (index expressions, VACUUM, ANALYZE, REFRESH MATERIALIZED VIEW)",
        ));
    }
    Ok(())
}

/// Whether the role the caller acts as has the privileges of `role`
/// (superusers have every role's).
fn caller_has_privs_of(role: &str) -> bool {
    let Ok(name) = std::ffi::CString::new(role) else {
        return false;
    };
    // SAFETY: catalog lookups of the current backend.
    unsafe {
        let oid = pg_sys::get_role_oid(name.as_ptr(), true);
        oid != pg_sys::InvalidOid && pg_sys::has_privs_of_role(pg_sys::GetOuterUserId(), oid)
    }
}

/// `tasker._caller() RETURNS oid`: the role the caller acts as (the
/// session's role, or the one SET ROLE chose), not the owner of the
/// SECURITY DEFINER function that asks.
#[pg_extern(stable, parallel_safe)]
fn _caller() -> ApiResult<pg_sys::Oid> {
    unrestricted()?;
    // SAFETY: reads a backend-local variable.
    Ok(unsafe { pg_sys::GetOuterUserId() })
}

/// `tasker._caller_holds_all(privilege) RETURNS boolean`: whether the
/// caller holds the privilege ('worker', 'app', 'admin', 'any') in every
/// namespace, through a cluster-wide role (or as a superuser). The hot
/// path's whole check: no query.
#[pg_extern(stable, parallel_safe)]
fn _caller_holds_all(privilege: &str) -> ApiResult<bool> {
    unrestricted()?;
    Ok(need(privilege)?
        .cluster_roles()
        .iter()
        .any(|r| caller_has_privs_of(r)))
}

/// `tasker._privileges_including(privilege) RETURNS text[]`: the granted
/// namespace privileges that include it.
#[pg_extern(immutable, parallel_safe)]
fn _privileges_including(privilege: &str) -> ApiResult<Vec<String>> {
    Ok(need(privilege)?
        .granted()
        .iter()
        .map(|s| s.to_string())
        .collect())
}

/// Whether the caller has the privileges of tasker_admin.
pub fn is_admin() -> bool {
    unrestricted().is_ok() && caller_has_privs_of("tasker_admin")
}
