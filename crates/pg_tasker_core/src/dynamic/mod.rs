//! Dynamic workflows: which steps a task starts with, and which steps a
//! decision or batchable step's result creates, with their edges.
//!
//! The rules (docs/templates.md, "Dynamic steps"):
//! - A step is *deferred* (not created by create_task) when it is a
//!   `batch_worker`, or depends on a decision step, or on a deferred step.
//! - A decision's *segment* is the forward walk from its children, stopping
//!   at (and including) other decision steps, never entering batch_worker
//!   steps. The names a decision asks for must lie in it.
//! - What an outcome creates: the requested steps (for a batch: one worker
//!   per cursor, from the batch_worker template), then their forward
//!   closure: children of created steps, except that a decision's children
//!   come only from its own outcome (but a deferred_convergence child of a
//!   created decision is created with it) and batch_worker steps only from
//!   their batchable step. Steps that exist are not created again (applying
//!   an outcome twice creates nothing).
//! - Edges go from created steps only (a step waits for the dependencies
//!   that exist, not for branches never taken). A step with a dependency
//!   that does not exist yet but that an unfinished decision or batchable
//!   step could still create gets a *gate* edge from that generator: it
//!   waits for the generator, whose outcome may add the dependency as a
//!   real edge. (Gate edges carry no result: dependency_results leaves
//!   them out.) Steps that exist and still wait get the edges of what is
//!   created now.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use crate::error::{Error, ErrorKind, Result};
use crate::template::{StepTemplate, StepType};

/// Checks the step types of a template's (ordered, acyclic) steps.
pub fn validate_types(steps: &[StepTemplate]) -> Result<()> {
    let types: HashMap<&str, StepType> = steps
        .iter()
        .map(|s| (s.name.as_str(), s.step_type))
        .collect();
    for s in steps {
        let ctx = format!("step \"{}\"", s.name);
        match s.step_type {
            StepType::Decision | StepType::DeferredConvergence if s.dependencies.is_empty() => {
                return Err(Error::invalid(format!(
                    "{ctx}: a {} step needs at least one dependency",
                    s.step_type.as_str()
                )))
            }
            StepType::BatchWorker => {
                let ok = s.dependencies.len() == 1
                    && types[s.dependencies[0].as_str()] == StepType::Batchable;
                if !ok {
                    return Err(Error::invalid(format!(
                        "{ctx}: a batch_worker step depends on exactly one step, a batchable one"
                    ))
                    .with_hint("dependencies: [<the batchable step>]"));
                }
            }
            StepType::Map if s.dependencies.len() > 1 => {
                return Err(Error::invalid(format!(
                    "{ctx}: a map step maps over one dependency's result (or the task context), it has {}",
                    s.dependencies.len()
                )))
            }
            StepType::Map
                if s.dependencies.len() == 1
                    && types[s.dependencies[0].as_str()] == StepType::BatchWorker =>
            {
                return Err(Error::invalid(format!(
                    "{ctx}: a map step cannot map over a batch_worker (its workers' results are many arrays)"
                ))
                .with_hint("map over the result of the step that converges on the workers"))
            }
            StepType::Map if s.dependencies.is_empty() && s.map_over.is_none() => {
                return Err(Error::invalid(format!(
                    "{ctx}: a map step without dependencies maps over the task context and needs map_over"
                ))
                .with_hint("map_over: \"items\" maps over the array at context.items"))
            }
            _ => {}
        }
        if s.step_type == StepType::Map {
            // element names must not be taken by other steps
            for other in steps {
                if is_element_name(&other.name, &s.name) {
                    return Err(Error::new(
                        ErrorKind::Duplicate,
                        format!(
                            "step \"{}\" has the name of an element of map step \"{}\"",
                            other.name, s.name
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The name of element `index` of map step `map`: `map[index]`.
pub fn element_name(map: &str, index: usize) -> String {
    format!("{map}[{index}]")
}

fn is_element_name(name: &str, map: &str) -> bool {
    name.strip_prefix(map)
        .and_then(|r| r.strip_prefix('['))
        .and_then(|r| r.strip_suffix(']'))
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

/// The longest batch_id (worker names stay short enough to index).
pub const MAX_BATCH_ID_LEN: usize = 64;

/// A batch_id: 1 to 64 of `A-Za-z0-9_-.` (so a worker's name is no map
/// element's, has no spaces and stays indexable).
pub fn is_batch_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_BATCH_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// The name of the worker for `batch_id`: `{worker_template}_{batch_id}`.
pub fn worker_name(worker_template: &str, batch_id: &str) -> String {
    format!("{worker_template}_{batch_id}")
}

/// tasker-core's cursor split of `total` items into `workers` batches:
/// ceiling division, 0-indexed, end exclusive, ids `%03d` from 001.
/// Returns (batch_id, start, end) per batch; none for 0 items.
pub fn split_cursors(total: u64, workers: u64) -> Vec<(String, u64, u64)> {
    if total == 0 || workers == 0 {
        return Vec::new();
    }
    let size = total.div_ceil(workers);
    (0..workers)
        .map(|i| (i * size, ((i + 1) * size).min(total)))
        .take_while(|(start, _)| *start < total)
        .enumerate()
        .map(|(i, (start, end))| (format!("{:03}", i + 1), start, end))
        .collect()
}

/// A template's dependency graph by position (steps in topological order).
pub struct Graph {
    pub names: Vec<String>,
    pub types: Vec<StepType>,
    pub deps: Vec<Vec<usize>>,
    pub children: Vec<Vec<usize>>,
    index: HashMap<String, usize>,
}

impl Graph {
    pub fn new(steps: &[StepTemplate]) -> Self {
        let index: HashMap<String, usize> = steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect();
        let deps: Vec<Vec<usize>> = steps
            .iter()
            .map(|s| s.dependencies.iter().map(|d| index[d.as_str()]).collect())
            .collect();
        let mut children = vec![Vec::new(); steps.len()];
        for (i, ds) in deps.iter().enumerate() {
            for &d in ds {
                children[d].push(i);
            }
        }
        Graph {
            names: steps.iter().map(|s| s.name.clone()).collect(),
            types: steps.iter().map(|s| s.step_type).collect(),
            deps,
            children,
            index,
        }
    }

    pub fn position(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// Whether each step is created by create_task (not deferred).
    pub fn initial(&self) -> Vec<bool> {
        let mut deferred = vec![false; self.names.len()];
        for i in 0..self.names.len() {
            deferred[i] = self.types[i] == StepType::BatchWorker
                || self.deps[i]
                    .iter()
                    .any(|&d| self.types[d] == StepType::Decision || deferred[d]);
        }
        deferred.into_iter().map(|d| !d).collect()
    }

    /// A decision's segment: the forward walk from its children, stopping
    /// at (and including) decision steps, without batch_worker steps.
    pub fn segment(&self, decision: usize) -> BTreeSet<usize> {
        let mut seen = BTreeSet::new();
        let mut queue: VecDeque<usize> = self.children[decision].iter().copied().collect();
        while let Some(c) = queue.pop_front() {
            if self.types[c] == StepType::BatchWorker || !seen.insert(c) {
                continue;
            }
            if self.types[c] != StepType::Decision {
                queue.extend(self.children[c].iter().copied());
            }
        }
        seen
    }

    /// Every step downstream of `from`.
    pub fn reach(&self, from: usize) -> HashSet<usize> {
        let mut seen = HashSet::new();
        let mut queue: VecDeque<usize> = self.children[from].iter().copied().collect();
        while let Some(c) = queue.pop_front() {
            if seen.insert(c) {
                queue.extend(self.children[c].iter().copied());
            }
        }
        seen
    }

    /// The forward closure of `start` (positions) as an outcome creates it.
    fn closure(&self, start: &BTreeSet<usize>) -> BTreeSet<usize> {
        let mut out = start.clone();
        let mut queue: VecDeque<usize> = start.iter().copied().collect();
        while let Some(m) = queue.pop_front() {
            for &c in &self.children[m] {
                let allowed = match self.types[m] {
                    // a decision's children come from its own outcome
                    StepType::Decision => self.types[c] == StepType::DeferredConvergence,
                    _ => self.types[c] != StepType::BatchWorker,
                };
                if allowed && out.insert(c) {
                    queue.push_back(c);
                }
            }
        }
        out
    }
}

/// A step row of the task, as a plan sees it (map elements left out).
#[derive(Debug, Clone)]
pub struct Row {
    pub name: String,
    /// Its template step.
    pub position: usize,
    /// Still pending (waiting for parents): may take new edges.
    pub pending: bool,
    /// Not done and not cancelled (for generators: may still create steps).
    pub unfinished: bool,
}

/// A generator's outcome, as its result states it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    CreateSteps(Vec<String>),
    NoBranches,
    CreateBatches {
        worker_template: Option<String>,
        batch_ids: Vec<String>,
    },
    NoBatches {
        worker_template: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct NewStep {
    pub name: String,
    pub position: usize,
    /// Batch workers: the index of its cursor in the outcome's list.
    pub batch: Option<usize>,
    /// The placeholder worker of `no_batches`.
    pub no_op: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Edge {
    pub from: String,
    pub to: String,
    /// A gate (wait for a generator) rather than a dependency.
    pub gate: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub steps: Vec<NewStep>,
    pub edges: Vec<Edge>,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_steps_per_decision: usize,
    pub max_batch_workers: usize,
}

/// What the outcome of generator row `generator` creates in a task whose
/// rows are `rows`. Err: why the outcome is invalid (the step fails for
/// good with it).
pub fn plan(
    g: &Graph,
    rows: &[Row],
    generator: &str,
    outcome: &Outcome,
    limits: Limits,
) -> std::result::Result<Plan, String> {
    let Some(gen_row) = rows.iter().find(|r| r.name == generator) else {
        return Err(format!("step \"{generator}\" is not a step of the task"));
    };
    let gp = gen_row.position;
    let gname = &g.names[gp];
    let gtype = g.types[gp];
    let created: HashSet<usize> = rows.iter().map(|r| r.position).collect();
    // (template position, row name, batch index, no-op) of every new row
    let mut new: Vec<NewStep> = Vec::new();
    let mut start = BTreeSet::new();
    match (gtype, outcome) {
        (StepType::Decision, Outcome::NoBranches) => {}
        (StepType::Decision, Outcome::CreateSteps(names)) => {
            if names.len() > limits.max_steps_per_decision {
                return Err(format!(
                    "decision \"{gname}\" asks for {} steps, more than the limit of {} (limits.max_steps_per_decision)",
                    names.len(),
                    limits.max_steps_per_decision
                ));
            }
            let segment = g.segment(gp);
            for n in names {
                match g.position(n) {
                    Some(p) if segment.contains(&p) => {
                        start.insert(p);
                    }
                    Some(_) => {
                        return Err(format!(
                            "decision \"{gname}\" asks for step \"{n}\", which is not in its segment ({})",
                            segment_names(g, &segment)
                        ))
                    }
                    None => {
                        return Err(format!(
                            "decision \"{gname}\" asks for step \"{n}\", which the template does not have (its segment: {})",
                            segment_names(g, &segment)
                        ))
                    }
                }
            }
        }
        (StepType::Batchable, Outcome::CreateBatches { .. } | Outcome::NoBatches { .. }) => {
            let asked = match outcome {
                Outcome::CreateBatches {
                    worker_template, ..
                }
                | Outcome::NoBatches { worker_template } => worker_template.as_deref(),
                _ => unreachable!(),
            };
            let workers: Vec<usize> = g.children[gp]
                .iter()
                .copied()
                .filter(|&c| g.types[c] == StepType::BatchWorker)
                .collect();
            let w = match asked {
                Some(n) => match g.position(n) {
                    Some(p) if workers.contains(&p) => p,
                    _ => {
                        return Err(format!(
                            "batchable step \"{gname}\" names worker template \"{n}\", which is not one of its batch_worker steps ({})",
                            list(workers.iter().map(|&p| g.names[p].as_str()))
                        ))
                    }
                },
                None if workers.len() == 1 => workers[0],
                None => {
                    return Err(format!(
                        "batchable step \"{gname}\" must name its worker_template_name (its batch_worker steps: {})",
                        list(workers.iter().map(|&p| g.names[p].as_str()))
                    ))
                }
            };
            if created.contains(&w) {
                // applied before: nothing more
                return Ok(Plan::default());
            }
            // names must be new in the task and in the template
            let taken: HashSet<&str> = g
                .names
                .iter()
                .map(String::as_str)
                .chain(rows.iter().map(|r| r.name.as_str()))
                .collect();
            let check = |name: &str| -> std::result::Result<(), String> {
                if taken.contains(name) {
                    Err(format!(
                        "batchable step \"{gname}\": worker \"{name}\" would take the name of a step of the template or the task"
                    ))
                } else {
                    Ok(())
                }
            };
            match outcome {
                Outcome::CreateBatches { batch_ids, .. } => {
                    if batch_ids.is_empty() {
                        return Err(format!(
                            "batchable step \"{gname}\": create_batches has no cursor_configs (use {{\"type\": \"no_batches\"}})"
                        ));
                    }
                    if batch_ids.len() > limits.max_batch_workers {
                        return Err(format!(
                            "batchable step \"{gname}\" asks for {} workers, more than the limit of {} (limits.max_batch_workers)",
                            batch_ids.len(),
                            limits.max_batch_workers
                        ));
                    }
                    let mut seen = HashSet::new();
                    for (i, id) in batch_ids.iter().enumerate() {
                        if !is_batch_id(id) {
                            return Err(format!(
                                "batchable step \"{gname}\": batch_id {id:?} is not 1 to {MAX_BATCH_ID_LEN} letters, digits, '_', '-' or '.'"
                            ));
                        }
                        let name = worker_name(&g.names[w], id);
                        if !seen.insert(name.clone()) {
                            return Err(format!(
                                "batchable step \"{gname}\": batch_id \"{id}\" appears more than once"
                            ));
                        }
                        check(&name)?;
                        new.push(NewStep {
                            name,
                            position: w,
                            batch: Some(i),
                            no_op: false,
                        });
                    }
                }
                _ => {
                    let name = worker_name(&g.names[w], "000");
                    check(&name)?;
                    new.push(NewStep {
                        name,
                        position: w,
                        batch: None,
                        no_op: true,
                    })
                }
            }
            // the closure starts after the workers
            for &c in &g.children[w] {
                start.insert(c);
            }
        }
        (StepType::Decision, _) => {
            return Err(format!(
                "decision \"{gname}\" returned a batch outcome; a decision's result has decision_point_outcome"
            ))
        }
        (StepType::Batchable, _) => {
            return Err(format!(
                "batchable step \"{gname}\" returned a decision outcome; its result has batch_processing_outcome"
            ))
        }
        (t, _) => {
            return Err(format!(
                "step \"{gname}\" is a {} step; only decision and batchable steps create steps",
                t.as_str()
            ))
        }
    }
    for p in g.closure(&start) {
        if !created.contains(&p) {
            new.push(NewStep {
                name: g.names[p].clone(),
                position: p,
                batch: None,
                no_op: false,
            });
        }
    }
    // (a batch's workers come first, so the order is deterministic)
    let new_positions: HashSet<usize> = new.iter().map(|s| s.position).collect();
    let mut rows_of: HashMap<usize, Vec<&str>> = HashMap::new();
    for r in rows {
        rows_of.entry(r.position).or_default().push(&r.name);
    }
    for s in &new {
        rows_of.entry(s.position).or_default().push(&s.name);
    }
    // generators that may still create steps: unfinished ones but this one,
    // and the new ones
    let generators: Vec<(&str, usize)> = rows
        .iter()
        .filter(|r| r.unfinished && r.name != generator && g.types[r.position].is_generator())
        .map(|r| (r.name.as_str(), r.position))
        .chain(
            new.iter()
                .filter(|s| g.types[s.position].is_generator())
                .map(|s| (s.name.as_str(), s.position)),
        )
        .collect();
    let new_generators: HashSet<&str> = new
        .iter()
        .filter(|s| g.types[s.position].is_generator())
        .map(|s| s.name.as_str())
        .collect();
    let mut reach: HashMap<usize, HashSet<usize>> = HashMap::new();
    let mut edges: BTreeSet<Edge> = BTreeSet::new();
    // the edges of a row: from the rows of its dependencies; for a
    // dependency that does not exist, a gate from every generator that may
    // still create it (with only_new: edges that involve something new)
    let mut edges_of = |to: &str, position: usize, only_new: bool| {
        for &d in &g.deps[position] {
            if let Some(froms) = rows_of.get(&d) {
                if !only_new || new_positions.contains(&d) {
                    for f in froms {
                        edges.insert(Edge {
                            from: f.to_string(),
                            to: to.to_string(),
                            gate: false,
                        });
                    }
                }
                continue;
            }
            for &(gn, gpos) in &generators {
                if only_new && !new_generators.contains(gn) {
                    continue;
                }
                if reach
                    .entry(gpos)
                    .or_insert_with(|| g.reach(gpos))
                    .contains(&d)
                {
                    edges.insert(Edge {
                        from: gn.to_string(),
                        to: to.to_string(),
                        gate: true,
                    });
                }
            }
        }
    };
    for s in &new {
        edges_of(&s.name, s.position, false);
    }
    for r in rows.iter().filter(|r| r.pending) {
        edges_of(&r.name, r.position, true);
    }
    Ok(Plan {
        steps: new,
        edges: edges.into_iter().collect(),
    })
}

fn segment_names(g: &Graph, segment: &BTreeSet<usize>) -> String {
    list(segment.iter().map(|&p| g.names[p].as_str()))
}

fn list<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<&str> = names.collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

#[cfg(test)]
mod tests;
