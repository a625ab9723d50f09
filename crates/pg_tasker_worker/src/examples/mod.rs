//! Handlers of the blog workloads (examples/templates/*.yaml), with inline
//! simulation of the outside world: no external services.

pub mod dynamic;
pub mod ecommerce;
pub mod microservices;
pub mod pipeline;
pub mod teams;

use crate::Registry;

/// Every example handler.
pub fn all() -> Registry {
    let mut r = Registry::new();
    r.merge(ecommerce::registry())
        .merge(pipeline::registry())
        .merge(microservices::registry())
        .merge(teams::registry())
        .merge(dynamic::registry());
    r
}

/// The handler set of a name given on the command line.
pub fn by_name(name: &str) -> Option<Registry> {
    Some(match name {
        "all" => all(),
        "ecommerce" => ecommerce::registry(),
        "pipeline" => pipeline::registry(),
        "microservices" => microservices::registry(),
        "teams" => teams::registry(),
        "dynamic" => dynamic::registry(),
        _ => return None,
    })
}

pub(crate) fn now_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}
