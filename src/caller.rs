//! Who is calling, and what it holds: the fast half of the namespace
//! privilege checks of `sql/03_privileges.sql` (the rule is
//! pg_tasker_core::privilege): what a cluster-wide role gives (no query),
//! and the namespaces granted to the caller, as this backend last read
//! them (`tasker._granted_namespaces`, kept until a change of grants or of
//! role memberships reaches the backend).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

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
    holds_all(need(privilege)?)
}

/// Whether the caller holds `need` in every namespace (see
/// `tasker._caller_holds_all`).
pub fn holds_all(need: Need) -> ApiResult<bool> {
    unrestricted()?;
    Ok(need.cluster_roles().iter().any(|r| caller_has_privs_of(r)))
}

/// The namespaces granted to roles, as this backend last read them:
/// (caller, privilege) -> names. Dropped whenever an invalidation reaches
/// the backend that may change an answer:
/// - a relcache invalidation of `tasker.namespace_grants`, which its
///   trigger sends on every change (`tasker._grants_changed`; PostgreSQL
///   delivers it to other backends when the change commits, applies it in
///   this one at once, and again when the change rolls back);
/// - a syscache invalidation of role memberships, roles or databases
///   (pg_auth_members, pg_authid, pg_database: GRANT role, REVOKE role,
///   NOINHERIT, DROP ROLE, a new database owner), as PostgreSQL's own
///   role-membership cache is;
/// - a cache reset (the backend fell behind the invalidation queue).
///
/// Every look first takes the invalidations sent so far, so a change counts
/// in every session from the moment its COMMIT returns, as a query of the
/// table would.
///
/// The epoch the answers were read in, and (caller, privilege) -> the
/// namespaces' names, sorted.
type Kept = (u64, HashMap<(pg_sys::Oid, Need), Vec<String>>);

thread_local! {
    static GRANTED: RefCell<Kept> = RefCell::new((0, HashMap::new()));
    /// Counts the invalidations that may change an answer. The callbacks
    /// touch nothing else (an invalidation can arrive in the middle of any
    /// catalog lookup); kept answers of an older epoch are dropped at the
    /// next look, and a fill during which the epoch moved is not kept.
    static EPOCH: Cell<u64> = const { Cell::new(0) };
    /// The oid of tasker.namespace_grants when the last fill began.
    static TABLE: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
    static CALLBACKS: Cell<bool> = const { Cell::new(false) };
}

fn forget_grants() {
    EPOCH.set(EPOCH.get() + 1);
}

#[pg_guard]
unsafe extern "C-unwind" fn on_relcache(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    if relid == pg_sys::InvalidOid || relid == TABLE.get() {
        forget_grants();
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_syscache(_arg: pg_sys::Datum, _cache: i32, _hash: u32) {
    forget_grants();
}

fn register_callbacks() {
    if !CALLBACKS.replace(true) {
        // SAFETY: registered once per backend (the slots are few), as
        // extensions do; the callbacks only bump a backend-local counter.
        unsafe {
            pg_sys::CacheRegisterRelcacheCallback(Some(on_relcache), pg_sys::Datum::from(0));
            // (as PostgreSQL's own membership cache: pg_database for
            // its owner, a member of pg_database_owner)
            for cache in [
                pg_sys::SysCacheIdentifier::AUTHMEMROLEMEM,
                pg_sys::SysCacheIdentifier::AUTHOID,
                pg_sys::SysCacheIdentifier::DATABASEOID,
            ] {
                pg_sys::CacheRegisterSyscacheCallback(
                    cache as i32,
                    Some(on_syscache),
                    pg_sys::Datum::from(0),
                );
            }
        }
    }
}

/// The oid of tasker.namespace_grants (InvalidOid while it does not exist).
fn grants_table() -> pg_sys::Oid {
    // SAFETY: catalog lookups of the current backend.
    unsafe {
        let schema = pg_sys::get_namespace_oid(c"tasker".as_ptr(), true);
        if schema == pg_sys::InvalidOid {
            return pg_sys::InvalidOid;
        }
        pg_sys::get_relname_relid(c"namespace_grants".as_ptr(), schema)
    }
}

/// `tasker._caller_namespaces(privilege) RETURNS text[]`: the namespaces
/// in which the caller holds the privilege, by name, sorted; NULL when it
/// holds it in every namespace (a cluster-wide role, or a superuser). The
/// grants are read by `tasker._granted_namespaces` and kept for the
/// session until a change reaches it (see `Kept`).
#[pg_extern(stable)]
fn _caller_namespaces(privilege: &str) -> ApiResult<Option<Vec<String>>> {
    let need = need(privilege)?;
    if holds_all(need)? {
        return Ok(None);
    }
    let key = (unsafe { pg_sys::GetOuterUserId() }, need);
    register_callbacks();
    // SAFETY: takes the invalidations other backends sent so far.
    unsafe { pg_sys::AcceptInvalidationMessages() };
    let epoch = EPOCH.get();
    let kept = GRANTED.with(|g| {
        let mut g = g.borrow_mut();
        if g.0 != epoch {
            *g = (epoch, HashMap::new());
        }
        g.1.get(&key).cloned()
    });
    if let Some(names) = kept {
        return Ok(Some(names));
    }
    TABLE.set(grants_table());
    // An answer is kept only when read with a snapshot taken after the
    // invalidations above: one of an older snapshot (the statement's, a
    // REPEATABLE READ transaction's) could still hold a grant whose revoke
    // has committed and whose invalidation has come, and would keep it for
    // the session. So the read gets the latest snapshot (SPI then reads
    // with it, or takes a newer one of its own in READ COMMITTED); in a
    // transaction that reads with its first snapshot throughout, or in
    // parallel mode, the answer is read as before, and not kept.
    // SAFETY: backend-local flags; the snapshot pushed is popped below
    // (an error on the way out is cleaned up by the abort).
    let fresh = unsafe {
        pg_sys::XactIsoLevel < pg_sys::XACT_REPEATABLE_READ as i32 && !pg_sys::IsInParallelMode()
    };
    if fresh {
        unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetLatestSnapshot()) };
    }
    let names = crate::read::one::<Vec<String>>(
        "SELECT tasker._granted_namespaces($1)",
        &[privilege.into()],
    );
    if fresh {
        unsafe { pg_sys::PopActiveSnapshot() };
    }
    let names = names?.unwrap_or_default();
    GRANTED.with(|g| {
        let mut g = g.borrow_mut();
        if fresh && EPOCH.get() == epoch && g.0 == epoch {
            g.1.insert(key, names.clone());
        }
    });
    Ok(Some(names))
}

/// `tasker._grants_changed() RETURNS void`: tells every backend's kept
/// grants (`Kept`) that tasker.namespace_grants changed: a relcache
/// invalidation of the table, applied in this backend at once and sent to
/// the others when this transaction commits (the table's trigger calls it).
#[pg_extern(volatile)]
fn _grants_changed() {
    let table = grants_table();
    if table != pg_sys::InvalidOid {
        // SAFETY: queues an invalidation message of this transaction.
        unsafe { pg_sys::CacheInvalidateRelcacheByRelid(table) };
    }
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
