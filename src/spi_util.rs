//! Small SPI helpers: rows as JSON (deserialized into typed structs), uuids.

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::JsonB;
use serde::de::DeserializeOwned;

use crate::errors::{internal, ApiResult};

pub fn pg_uuid(u: uuid::Uuid) -> pgrx::Uuid {
    pgrx::Uuid::from_bytes(*u.as_bytes())
}

/// Runs `sql`, which must return at most one row with one jsonb column, and
/// deserializes it. `Ok(None)` when there is no row (or the value is NULL).
pub fn json_row<T: DeserializeOwned>(sql: &str, args: &[DatumWithOid]) -> ApiResult<Option<T>> {
    match Spi::get_one_with_args::<JsonB>(sql, args) {
        Ok(Some(j)) => serde_json::from_value(j.0).map(Some).map_err(internal),
        Ok(None) | Err(pgrx::spi::Error::InvalidPosition) => Ok(None),
        Err(e) => Err(internal(e)),
    }
}

/// A single scalar; `Ok(None)` when there is no row or the value is NULL.
pub fn scalar<T: FromDatum + IntoDatum>(sql: &str, args: &[DatumWithOid]) -> ApiResult<Option<T>> {
    match Spi::get_one_with_args::<T>(sql, args) {
        Ok(v) => Ok(v),
        Err(pgrx::spi::Error::InvalidPosition) => Ok(None),
        Err(e) => Err(internal(e)),
    }
}

pub fn run(sql: &str, args: &[DatumWithOid]) -> ApiResult<()> {
    Spi::run_with_args(sql, args).map_err(internal)
}
