use serde_json::{json, Value};

use super::*;
use crate::template::parse_value;

fn step(name: &str, ty: &str, deps: &[&str]) -> Value {
    json!({"name": name, "type": ty, "dependencies": deps, "handler": {"callable": "h"}})
}

fn graph(steps: Vec<Value>) -> Graph {
    let t = parse_value(
        json!({"name": "t", "namespace_name": "ns", "version": "1.0.0", "steps": steps}),
    )
    .expect("valid template");
    Graph::new(&t.steps)
}

fn rows(g: &Graph, names: &[(&str, bool, bool)]) -> Vec<Row> {
    names
        .iter()
        .map(|&(n, pending, unfinished)| Row {
            name: n.to_string(),
            position: g
                .position(n.split('_').next().unwrap())
                .or(g.position(n))
                .unwrap(),
            pending,
            unfinished,
        })
        .collect()
}

const LIMITS: Limits = Limits {
    max_steps_per_decision: 50,
    max_batch_workers: 100,
};

fn names(p: &Plan) -> Vec<&str> {
    p.steps.iter().map(|s| s.name.as_str()).collect()
}

fn edges(p: &Plan) -> Vec<String> {
    p.edges
        .iter()
        .map(|e| format!("{}{}{}", e.from, if e.gate { "~>" } else { "->" }, e.to))
        .collect()
}

/// validate -> decide -> {auto, manager, finance}; finalize converges on
/// all three; manager -> notify.
fn approval() -> Graph {
    graph(vec![
        step("validate", "standard", &[]),
        step("decide", "decision", &["validate"]),
        step("auto", "standard", &["decide"]),
        step("manager", "standard", &["decide"]),
        step("finance", "standard", &["decide"]),
        step("notify", "standard", &["manager"]),
        step(
            "finalize",
            "deferred_convergence",
            &["auto", "manager", "finance"],
        ),
    ])
}

#[test]
fn create_task_starts_with_the_steps_before_the_decision() {
    let g = approval();
    let initial: Vec<&str> = g
        .initial()
        .iter()
        .enumerate()
        .filter(|(_, &i)| i)
        .map(|(p, _)| g.names[p].as_str())
        .collect();
    assert_eq!(initial, ["validate", "decide"]);
}

#[test]
fn a_decision_creates_its_branches_their_closure_and_the_convergence() {
    let g = approval();
    let r = rows(&g, &[("validate", false, false), ("decide", false, false)]);
    let p = plan(
        &g,
        &r,
        "decide",
        &Outcome::CreateSteps(vec!["manager".into(), "finance".into()]),
        LIMITS,
    )
    .unwrap();
    let mut n = names(&p);
    n.sort();
    assert_eq!(n, ["finalize", "finance", "manager", "notify"]);
    assert_eq!(
        edges(&p),
        [
            "decide->finance",
            "decide->manager",
            "finance->finalize",
            "manager->finalize",
            "manager->notify"
        ]
    );
    // applying it again creates nothing
    let mut r2 = r.clone();
    for s in &p.steps {
        r2.push(Row {
            name: s.name.clone(),
            position: s.position,
            pending: true,
            unfinished: true,
        });
    }
    let again = plan(
        &g,
        &r2,
        "decide",
        &Outcome::CreateSteps(vec!["manager".into(), "finance".into()]),
        LIMITS,
    )
    .unwrap();
    assert!(again.steps.is_empty(), "{again:?}");
}

#[test]
fn no_branches_creates_nothing_and_bad_names_are_refused() {
    let g = approval();
    let r = rows(&g, &[("validate", false, false), ("decide", false, false)]);
    assert_eq!(
        plan(&g, &r, "decide", &Outcome::NoBranches, LIMITS).unwrap(),
        Plan::default()
    );
    let e = plan(
        &g,
        &r,
        "decide",
        &Outcome::CreateSteps(vec!["validate".into()]),
        LIMITS,
    )
    .unwrap_err();
    assert!(
        e.contains("not in its segment") && e.contains("auto, manager, finance"),
        "{e}"
    );
    let e = plan(
        &g,
        &r,
        "decide",
        &Outcome::CreateSteps(vec!["nope".into()]),
        LIMITS,
    )
    .unwrap_err();
    assert!(e.contains("does not have"), "{e}");
    let e = plan(
        &g,
        &r,
        "decide",
        &Outcome::CreateSteps(vec!["auto".into(), "manager".into()]),
        Limits {
            max_steps_per_decision: 1,
            ..LIMITS
        },
    )
    .unwrap_err();
    assert!(e.contains("limits.max_steps_per_decision"), "{e}");
    let e = plan(
        &g,
        &r,
        "decide",
        &Outcome::NoBatches {
            worker_template: None,
        },
        LIMITS,
    )
    .unwrap_err();
    assert!(e.contains("decision_point_outcome"), "{e}");
}

/// d1 -> {a, d2}; d2 -> {b}; fin converges on a and b.
fn nested() -> Graph {
    graph(vec![
        step("start", "standard", &[]),
        step("d1", "decision", &["start"]),
        step("a", "standard", &["d1"]),
        step("d2", "decision", &["d1"]),
        step("b", "standard", &["d2"]),
        step("c", "standard", &["d2"]),
        step("fin", "deferred_convergence", &["a", "b"]),
    ])
}

#[test]
fn a_convergence_waits_for_a_nested_decision_that_may_still_create_its_dependency() {
    let g = nested();
    assert_eq!(
        g.segment(1)
            .into_iter()
            .map(|p| g.names[p].as_str())
            .collect::<Vec<_>>(),
        ["a", "d2", "fin"]
    );
    let r = rows(&g, &[("start", false, false), ("d1", false, false)]);
    let p = plan(
        &g,
        &r,
        "d1",
        &Outcome::CreateSteps(vec!["a".into(), "d2".into()]),
        LIMITS,
    )
    .unwrap();
    let mut n = names(&p);
    n.sort();
    assert_eq!(n, ["a", "d2", "fin"]);
    // fin waits for a (its dependency) and for d2 (which may create b)
    assert_eq!(edges(&p), ["a->fin", "d1->a", "d1->d2", "d2~>fin"]);
    // d2 decides b: b is created, and fin (pending) takes the edge b -> fin
    let r2 = rows(
        &g,
        &[
            ("start", false, false),
            ("d1", false, false),
            ("a", false, false),
            ("d2", false, true),
            ("fin", true, true),
        ],
    );
    let p2 = plan(
        &g,
        &r2,
        "d2",
        &Outcome::CreateSteps(vec!["b".into()]),
        LIMITS,
    )
    .unwrap();
    assert_eq!(names(&p2), ["b"]);
    assert_eq!(edges(&p2), ["b->fin", "d2->b"]);
    // d2 decides c only: nothing for fin
    let p3 = plan(
        &g,
        &r2,
        "d2",
        &Outcome::CreateSteps(vec!["c".into()]),
        LIMITS,
    )
    .unwrap();
    assert_eq!(edges(&p3), ["d2->c"]);
}

fn batch() -> Graph {
    graph(vec![
        step("analyze", "batchable", &[]),
        step("work", "batch_worker", &["analyze"]),
        step("aggregate", "deferred_convergence", &["work"]),
        step("report", "standard", &["aggregate"]),
    ])
}

#[test]
fn a_batch_creates_one_worker_per_cursor_then_the_convergence() {
    let g = batch();
    assert_eq!(g.initial(), [true, false, false, false]);
    let r = rows(&g, &[("analyze", false, false)]);
    let out = Outcome::CreateBatches {
        worker_template: Some("work".into()),
        batch_ids: vec!["001".into(), "002".into(), "003".into()],
    };
    let p = plan(&g, &r, "analyze", &out, LIMITS).unwrap();
    assert_eq!(
        names(&p),
        ["work_001", "work_002", "work_003", "aggregate", "report"]
    );
    assert_eq!(p.steps[1].batch, Some(1));
    assert_eq!(
        edges(&p),
        [
            "aggregate->report",
            "analyze->work_001",
            "analyze->work_002",
            "analyze->work_003",
            "work_001->aggregate",
            "work_002->aggregate",
            "work_003->aggregate"
        ]
    );
    // twice: nothing
    let mut r2 = r.clone();
    r2.push(Row {
        name: "work_001".into(),
        position: 1,
        pending: true,
        unfinished: true,
    });
    assert_eq!(
        plan(&g, &r2, "analyze", &out, LIMITS).unwrap(),
        Plan::default()
    );
    // no batches: one placeholder
    let p = plan(
        &g,
        &r,
        "analyze",
        &Outcome::NoBatches {
            worker_template: None,
        },
        LIMITS,
    )
    .unwrap();
    assert_eq!(names(&p), ["work_000", "aggregate", "report"]);
    assert!(p.steps[0].no_op);
    let e = plan(
        &g,
        &r,
        "analyze",
        &Outcome::CreateBatches {
            worker_template: Some("report".into()),
            batch_ids: vec!["1".into()],
        },
        LIMITS,
    )
    .unwrap_err();
    assert!(
        e.contains("not one of its batch_worker steps (work)"),
        "{e}"
    );
}

#[test]
fn cursors_split_like_tasker_core() {
    assert_eq!(
        split_cursors(250, 3),
        [
            ("001".into(), 0, 84),
            ("002".into(), 84, 168),
            ("003".into(), 168, 250)
        ]
    );
    assert_eq!(split_cursors(2, 5).len(), 2);
    assert!(split_cursors(0, 3).is_empty());
    assert_eq!(split_cursors(10, 1), [("001".into(), 0, 10)]);
}

#[test]
fn step_types_are_checked() {
    let bad = |steps: Vec<Value>| {
        parse_value(
            json!({"name": "t", "namespace_name": "ns", "version": "1.0.0", "steps": steps}),
        )
        .unwrap_err()
        .message
    };
    assert!(bad(vec![step("d", "decision", &[])]).contains("at least one dependency"));
    assert!(bad(vec![
        step("a", "standard", &[]),
        step("w", "batch_worker", &["a"])
    ])
    .contains("batchable"));
    assert!(bad(vec![step("m", "map", &[])]).contains("map_over"));
    let mut m = step("m", "map", &[]);
    m["map_over"] = json!("items");
    assert!(bad(vec![m.clone(), step("m[0]", "standard", &[])]).contains("element of map step"));
    let mut s = step("s", "standard", &[]);
    s["map_over"] = json!("x");
    assert!(bad(vec![s]).contains("map_over belongs to map steps"));
    let mut w = step("w", "standard", &[]);
    w["batch_config"] = json!({"cursor_field": "id"});
    assert!(bad(vec![w]).contains("batch_config belongs"));
    let mut w = step("w", "batch_worker", &["b"]);
    w["batch_config"] = json!({"failure_strategy": "sometimes"});
    assert!(bad(vec![step("b", "batchable", &[]), w]).contains("invalid batch_config"));
    assert!(bad(vec![step("x", "conditional", &[])]).contains("unknown step type"));
    // step_type is an alias of type
    let t = parse_value(json!({"name": "t", "namespace_name": "ns", "version": "1.0.0", "steps": [
        {"name": "a", "handler": {"callable": "h"}},
        {"name": "d", "step_type": "decision", "depends_on": ["a"], "handler": {"callable": "h"}}]}))
    .unwrap();
    assert_eq!(t.steps[1].step_type, StepType::Decision);
    assert_eq!(
        crate::template::parse_path("$.order.items").unwrap(),
        ["order", "items"]
    );
    assert!(crate::template::parse_path("a..b").is_none());
}

#[test]
fn worker_names_must_be_new_and_plain() {
    let g = graph(vec![
        step("analyze", "batchable", &[]),
        step("work", "batch_worker", &["analyze"]),
        step("work_000", "standard", &[]),
        step("work_x", "standard", &[]),
    ]);
    let r: Vec<Row> = ["analyze", "work_000", "work_x"]
        .iter()
        .map(|n| Row {
            name: n.to_string(),
            position: g.position(n).unwrap(),
            pending: false,
            unfinished: false,
        })
        .collect();
    let batch = |ids: &[&str]| Outcome::CreateBatches {
        worker_template: Some("work".into()),
        batch_ids: ids.iter().map(|s| s.to_string()).collect(),
    };
    for (ids, needle) in [
        (vec!["x"], "would take the name"),
        (vec!["a[0]"], "is not 1 to 64"),
        (vec![" "], "is not 1 to 64"),
        (vec![""], "is not 1 to 64"),
        (vec!["1", "1"], "more than once"),
    ] {
        let e = plan(&g, &r, "analyze", &batch(&ids), LIMITS).unwrap_err();
        assert!(e.contains(needle), "{ids:?}: {e}");
    }
    let long = "9".repeat(65);
    assert!(plan(&g, &r, "analyze", &batch(&[long.as_str()]), LIMITS).is_err());
    let e = plan(
        &g,
        &r,
        "analyze",
        &Outcome::NoBatches {
            worker_template: None,
        },
        LIMITS,
    )
    .unwrap_err();
    assert!(e.contains("work_000"), "{e}");
    // a map cannot map over a batch worker's many results
    let mut m = step("m", "map", &["work"]);
    m["map_over"] = json!("items");
    let e = parse_value(
        json!({"name": "t", "namespace_name": "ns", "version": "1.0.0", "steps": [
        step("analyze", "batchable", &[]), step("work", "batch_worker", &["analyze"]), m]}),
    )
    .unwrap_err();
    assert!(
        e.message.contains("cannot map over a batch_worker"),
        "{}",
        e.message
    );
}
