//! Who is calling: the role a session acts as, for the namespace privilege
//! checks of `sql/03_privileges.sql`.

use pgrx::prelude::*;

/// `tasker._caller() RETURNS oid`: the role the caller acts as (the
/// session's role, or the one SET ROLE chose), not the owner of the
/// SECURITY DEFINER function that asks.
#[pg_extern(stable, parallel_safe)]
fn _caller() -> pg_sys::Oid {
    // SAFETY: reads a backend-local variable.
    unsafe { pg_sys::GetOuterUserId() }
}

/// Whether the caller has the privileges of tasker_admin (superusers do).
pub fn is_admin() -> bool {
    // SAFETY: plain catalog lookups of the current backend.
    unsafe {
        let admin = pg_sys::get_role_oid(c"tasker_admin".as_ptr(), true);
        admin != pg_sys::InvalidOid && pg_sys::has_privs_of_role(pg_sys::GetOuterUserId(), admin)
    }
}
