//! Dynamic workflows (examples/templates/approvals_*.yaml,
//! csv_processing_*.yaml, math_map_squares.yaml): a decision routing by
//! amount, batch workers that checkpoint as they go, a map step, and a
//! decision that leads into a batch.

use std::time::Duration;

use serde_json::{json, Value};

use crate::{Outcome, Registry, StepContext};

/// Rows a batch worker processes between two checkpoints.
const CHUNK: u64 = 10;

fn names_of(step: &StepContext) -> Vec<String> {
    let mut k: Vec<String> = step.message.dependency_results.keys().cloned().collect();
    k.sort();
    k
}

/// Processes rows `start..end` of a synthetic file (row i holds the value
/// i), resuming from the step's checkpoint, saving one every CHUNK rows.
async fn process_batch(step: StepContext) -> Outcome {
    let init = &step.message.handler.initialization;
    let cursor = &init["cursor"];
    let batch_id = cursor["batch_id"].as_str().unwrap_or("").to_string();
    if init["is_no_op"] == json!(true) {
        return Outcome::success(json!({"batch_id": batch_id, "rows": 0, "sum": 0, "no_op": true}));
    }
    let ctx = &step.message.task_context;
    if ctx["bad_batch"].as_str() == Some(batch_id.as_str()) {
        return Outcome::permanent(format!("batch {batch_id} is corrupt"), "BAD_BATCH");
    }
    let (start, end) = (
        cursor["start_cursor"].as_u64().unwrap_or(0),
        cursor["end_cursor"].as_u64().unwrap_or(0),
    );
    let delay = Duration::from_millis(ctx["row_delay_ms"].as_u64().unwrap_or(0));
    // resume where the last attempt stopped
    let (mut next, mut sum) = match &step.message.checkpoint {
        Some(c) => (
            c["cursor"].as_u64().unwrap_or(start),
            c["sum"].as_u64().unwrap_or(0),
        ),
        None => (start, 0),
    };
    let resumed_from = step.message.checkpoint.as_ref().map(|_| next);
    while next < end {
        let upto = (next + CHUNK).min(end);
        for row in next..upto {
            tokio::time::sleep(delay).await;
            sum += row;
        }
        next = upto;
        if next < end {
            if let Err(e) = step.checkpoint(json!({"cursor": next, "sum": sum})).await {
                return Outcome::retryable(format!("could not save a checkpoint: {e}"));
            }
        }
    }
    Outcome::success(json!({
        "batch_id": batch_id, "rows": end - start, "sum": sum, "resumed_from": resumed_from,
        "cursor_field": init["batch_metadata"]["cursor_field"],
    }))
}

/// The totals of the batch workers among a step's dependencies.
fn totals(step: &StepContext) -> Value {
    let workers: Vec<&Value> = step
        .message
        .dependency_results
        .values()
        .filter(|v| v.get("batch_id").is_some())
        .collect();
    json!({
        "batches": workers.len(),
        "rows": workers.iter().map(|v| v["rows"].as_u64().unwrap_or(0)).sum::<u64>(),
        "sum": workers.iter().map(|v| v["sum"].as_u64().unwrap_or(0)).sum::<u64>(),
        "resumed": workers.iter().filter(|v| !v["resumed_from"].is_null()).count(),
    })
}

pub fn registry() -> Registry {
    let mut r = Registry::new();
    // conditional approval
    r.register(
        "Approvals::ValidateRequest",
        |step: StepContext| async move {
            match step.message.task_context["amount"].as_f64() {
                Some(a) if a >= 0.0 => Outcome::success(json!({"amount": a})),
                _ => Outcome::permanent("amount must be a non-negative number", "INVALID_AMOUNT"),
            }
        },
    );
    r.register(
        "Approvals::RoutingDecision",
        |step: StepContext| async move {
            let amount = step
                .dependency("validate_request")
                .and_then(|v| v["amount"].as_f64())
                .unwrap_or(0.0);
            if amount == 0.0 {
                Outcome::no_branches()
            } else if amount < 1_000.0 {
                Outcome::decision(&["auto_approve"])
            } else if amount < 5_000.0 {
                Outcome::decision(&["manager_approval"])
            } else {
                Outcome::decision(&["manager_approval", "finance_review"])
            }
        },
    );
    for (callable, by) in [
        ("Approvals::AutoApprove", "system"),
        ("Approvals::ManagerApproval", "manager"),
        ("Approvals::FinanceReview", "finance"),
    ] {
        r.register(callable, move |_step: StepContext| async move {
            Outcome::success(json!({"approved": true, "by": by}))
        });
    }
    r.register(
        "Approvals::FinalizeApproval",
        |step: StepContext| async move {
            let by: Vec<Value> = step
                .message
                .dependency_results
                .values()
                .map(|v| v["by"].clone())
                .collect();
            Outcome::success(json!({"approved": true, "branches": names_of(&step), "by": by}))
        },
    );
    // batches
    r.register("Csv::AnalyzeCsv", |step: StepContext| async move {
        let ctx = &step.message.task_context;
        let rows = ctx["rows"].as_u64().unwrap_or(0);
        let workers = ctx["workers"].as_u64().unwrap_or(3);
        Outcome::batches("process_csv_batch", rows, workers)
    });
    r.register("Csv::ProcessCsvBatch", process_batch);
    r.register("Csv::AggregateCsvResults", |step: StepContext| async move {
        Outcome::success(totals(&step))
    });
    // map
    r.register("Math::SplitNumbers", |step: StepContext| async move {
        Outcome::success(json!({"numbers": step.message.task_context["numbers"]}))
    });
    r.register("Math::Square", |step: StepContext| async move {
        // (an element's message carries its item, not the task context)
        let flaky = step.setting("flaky_item");
        if flaky.is_some() && flaky == step.map_item() && step.message.attempt == 1 {
            return Outcome::retry_after("flaky element", Duration::ZERO);
        }
        match step.map_item().and_then(Value::as_i64) {
            Some(x) => Outcome::success(json!(x * x)),
            None => Outcome::permanent("map_item must be an integer", "NOT_A_NUMBER"),
        }
    });
    r.register("Math::SumSquares", |step: StepContext| async move {
        let squares = step.dependency("square").cloned().unwrap_or(json!([]));
        let sum: i64 = squares
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_i64).sum())
            .unwrap_or(0);
        Outcome::success(json!({"sum": sum, "count": squares.as_array().map_or(0, Vec::len)}))
    });
    // a decision leading into a batch
    r.register("Approvals::CheckOrder", |step: StepContext| async move {
        Outcome::success(json!({"lines": step.message.task_context["lines"]}))
    });
    r.register("Approvals::ReviewRoute", |step: StepContext| async move {
        let lines = step
            .dependency("check_order")
            .and_then(|v| v["lines"].as_u64())
            .unwrap_or(0);
        if lines > 100 {
            Outcome::decision(&["analyze_lines"])
        } else {
            Outcome::decision(&["manual_review"])
        }
    });
    r.register("Approvals::ManualReview", |_step: StepContext| async move {
        Outcome::success(json!({"reviewed_by": "clerk"}))
    });
    r.register("Approvals::AnalyzeLines", |step: StepContext| async move {
        let lines = step.message.task_context["lines"].as_u64().unwrap_or(0);
        Outcome::batches("review_lines", lines, lines.div_ceil(100))
    });
    r.register(
        "Approvals::SummarizeReview",
        |step: StepContext| async move {
            let mut t = totals(&step);
            t["path"] = json!(names_of(&step));
            Outcome::success(t)
        },
    );
    r
}
