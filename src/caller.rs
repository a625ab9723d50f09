//! Who is calling, and what it holds everywhere: the fast half of the
//! namespace privilege checks of `sql/03_privileges.sql` (the rule is
//! pg_tasker_core::privilege).

use pg_tasker_core::privilege::Need;
use pgrx::prelude::*;

use crate::errors::{internal, ApiResult};

fn need(p: &str) -> ApiResult<Need> {
    Need::parse(p).ok_or_else(|| internal(format!("unknown privilege \"{p}\"")))
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
fn _caller() -> pg_sys::Oid {
    // SAFETY: reads a backend-local variable.
    unsafe { pg_sys::GetOuterUserId() }
}

/// `tasker._caller_holds_all(privilege) RETURNS boolean`: whether the
/// caller holds the privilege ('worker', 'app', 'admin', 'any') in every
/// namespace, through a cluster-wide role (or as a superuser). The hot
/// path's whole check: no query.
#[pg_extern(stable, parallel_safe)]
fn _caller_holds_all(privilege: &str) -> ApiResult<bool> {
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
    caller_has_privs_of("tasker_admin")
}
