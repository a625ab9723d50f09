//! Dynamic steps: the plan of what a decision's or batchable step's outcome
//! creates (pg_tasker_core::dynamic), for sql/18_dynamic.sql, which reads the
//! outcome from the result (jsonb, in SQL) and writes the rows.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use pg_tasker_core::dynamic::{self, Graph, Limits, Outcome, Row};
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::json;

use crate::errors::{internal, invalid, ApiResult};

thread_local! {
    /// Template graphs by (template_uuid, updated_at).
    static GRAPHS: RefCell<HashMap<(pgrx::Uuid, i64), Rc<Graph>>> = RefCell::new(HashMap::new());
}

fn graph(template_uuid: pgrx::Uuid, updated_at: i64) -> ApiResult<Rc<Graph>> {
    if let Some(g) = GRAPHS.with(|c| c.borrow().get(&(template_uuid, updated_at)).cloned()) {
        return Ok(g);
    }
    let t = crate::templates::load(template_uuid)?;
    let g = Rc::new(Graph::new(&t.steps));
    GRAPHS.with(|c| {
        let mut c = c.borrow_mut();
        if c.len() > 64 {
            c.clear();
        }
        c.insert((template_uuid, updated_at), g.clone());
    });
    Ok(g)
}

/// `tasker._plan_steps(...)`: what the outcome `kind` (create_steps,
/// no_branches, create_batches, no_batches) of generator step `generator`
/// creates, given the task's rows (map elements left out): `{"steps":
/// [{name, position, batch, no_op}], "edges": [{from, to, gate}]}`, or
/// `{"problem": text}` when the outcome is invalid.
#[allow(clippy::too_many_arguments)]
#[pg_extern]
fn _plan_steps(
    template_uuid: pgrx::Uuid,
    updated_at: pgrx::datum::TimestampWithTimeZone,
    generator: &str,
    kind: &str,
    names: Vec<String>,
    worker_template: Option<String>,
    row_names: Vec<String>,
    row_positions: Vec<i32>,
    row_pending: Vec<bool>,
    row_unfinished: Vec<bool>,
) -> ApiResult<JsonB> {
    let g = graph(template_uuid, updated_at.into_inner())?;
    let outcome = match kind {
        "create_steps" => Outcome::CreateSteps(names),
        "no_branches" => Outcome::NoBranches,
        "create_batches" => Outcome::CreateBatches {
            worker_template,
            batch_ids: names,
        },
        "no_batches" => Outcome::NoBatches { worker_template },
        other => return Err(invalid(format!("unknown outcome \"{other}\""))),
    };
    let n = row_names.len();
    if row_positions.len() != n || row_pending.len() != n || row_unfinished.len() != n {
        return Err(internal("_plan_steps: row arrays differ in length"));
    }
    let mut rows = Vec::with_capacity(n);
    for (((name, position), pending), unfinished) in row_names
        .into_iter()
        .zip(row_positions)
        .zip(row_pending)
        .zip(row_unfinished)
    {
        let position = usize::try_from(position)
            .ok()
            .filter(|&p| p < g.names.len())
            .ok_or_else(|| internal(format!("step \"{name}\" has position {position}")))?;
        rows.push(Row {
            name,
            position,
            pending,
            unfinished,
        });
    }
    let limits = crate::settings::with_current(|c| Limits {
        max_steps_per_decision: c.limits.max_steps_per_decision as usize,
        max_batch_workers: c.limits.max_batch_workers as usize,
    });
    Ok(JsonB(
        match dynamic::plan(&g, &rows, generator, &outcome, limits) {
            Err(problem) => json!({ "problem": problem }),
            Ok(p) => json!({
                "steps": p.steps.iter().map(|s| json!({
                    "name": s.name, "position": s.position, "batch": s.batch, "no_op": s.no_op,
                })).collect::<Vec<_>>(),
                "edges": p.edges.iter().map(|e| json!({
                    "from": e.from, "to": e.to, "gate": e.gate,
                })).collect::<Vec<_>>(),
            }),
        },
    ))
}

/// `tasker._map_element_name(map, index) RETURNS text`: the name of a map
/// step's element (`map[index]`).
#[pg_extern(immutable, parallel_safe)]
fn _map_element_name(map: &str, index: i32) -> String {
    dynamic::element_name(map, index.max(0) as usize)
}
