//! Blog post 02: a data pipeline DAG (namespace `data_pipeline`, template
//! `customer_analytics`): three extracts run in parallel, each feeds its
//! transform, an aggregate joins the three, insights follow. Each handler
//! records when it ran, so parallelism shows in the results.

use std::time::Duration;

use serde_json::{json, Value};

use super::now_ms;
use crate::{Outcome, Registry, StepContext};

fn timed(result: Value, started: f64) -> Outcome {
    let mut r = result;
    r["started_ms"] = json!(started);
    r["finished_ms"] = json!(now_ms());
    Outcome::success(r)
}

pub fn registry() -> Registry {
    let mut r = Registry::new();
    for (callable, source, records) in [
        ("DataPipeline::ExtractSalesHandler", "sales", 1200),
        ("DataPipeline::ExtractInventoryHandler", "inventory", 340),
        ("DataPipeline::ExtractCustomersHandler", "customers", 560),
    ] {
        r.register(callable, move |_step: StepContext| async move {
            let started = now_ms();
            tokio::time::sleep(Duration::from_millis(150)).await; // the "query"
            timed(json!({"source": source, "records": records}), started)
        });
    }
    for (callable, input) in [
        ("DataPipeline::TransformSalesHandler", "extract_sales_data"),
        (
            "DataPipeline::TransformInventoryHandler",
            "extract_inventory_data",
        ),
        (
            "DataPipeline::TransformCustomersHandler",
            "extract_customer_data",
        ),
    ] {
        r.register(callable, move |step: StepContext| async move {
            let started = now_ms();
            let Some(extract) = step.dependency(input).cloned() else {
                return Outcome::permanent(format!("missing input {input}"), "MISSING_INPUT");
            };
            tokio::time::sleep(Duration::from_millis(50)).await;
            let records = extract["records"].as_i64().unwrap_or(0);
            timed(
                json!({"source": extract["source"], "clean_records": records - records / 100}),
                started,
            )
        });
    }
    r.register(
        "DataPipeline::AggregateMetricsHandler",
        |step: StepContext| async move {
            let started = now_ms();
            let total: i64 = step
                .message
                .dependency_results
                .values()
                .map(|v| v["clean_records"].as_i64().unwrap_or(0))
                .sum();
            let mut sources: Vec<String> = step
                .message
                .dependency_results
                .values()
                .filter_map(|v| v["source"].as_str().map(str::to_string))
                .collect();
            sources.sort();
            timed(json!({"total_records": total, "sources": sources}), started)
        },
    );
    r.register("DataPipeline::GenerateInsightsHandler", |step: StepContext| async move {
        let started = now_ms();
        let total = step.dependency("aggregate_metrics").and_then(|v| v["total_records"].as_i64()).unwrap_or(0);
        timed(json!({"insights": [format!("{total} clean records across 3 sources")], "total_records": total}), started)
    });
    r
}
