//! Reads through SPI that write nothing. pgrx's `Spi::get_one` and its
//! kin mark the transaction as one that writes (they give it a transaction
//! id), which a read must not need: every call would burn an xid and write
//! a commit record, and on a standby it fails ("cannot assign TransactionIds
//! during recovery"). Reads go through here instead.

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::{FromDatum, IntoDatum};

use crate::errors::{internal, ApiResult};

/// The first column of the first row of a read-only query (None: no row,
/// or NULL).
pub fn one<T: FromDatum + IntoDatum>(sql: &str, args: &[DatumWithOid<'_>]) -> ApiResult<Option<T>> {
    Spi::connect(|c| c.select(sql, Some(1), args)?.first().get_one::<T>()).map_err(internal)
}
