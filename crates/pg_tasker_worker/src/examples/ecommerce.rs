//! Blog post 01: e-commerce checkout (namespace `ecommerce`, template
//! `process_order`): validate_cart → process_payment → update_inventory →
//! create_order → send_confirmation.
//!
//! Payment tokens drive the simulation: `tok_timeout_twice` times out on the
//! first two attempts, `tok_declined` is a permanent decline.

use std::time::Duration;

use serde_json::{json, Value};

use crate::{Outcome, Registry, StepContext};

fn items(step: &StepContext) -> Vec<Value> {
    step.message.task_context["cart_items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn tier(step: &StepContext) -> String {
    step.message.task_context["customer_info"]["tier"]
        .as_str()
        .unwrap_or("standard")
        .to_string()
}

pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register(
        "Ecommerce::StepHandlers::ValidateCartHandler",
        |step: StepContext| async move {
            let items = items(&step);
            if items.is_empty() {
                return Outcome::permanent("cart is empty", "EMPTY_CART");
            }
            let subtotal: f64 = items
                .iter()
                .map(|i| {
                    i["price"].as_f64().unwrap_or(10.0) * i["quantity"].as_f64().unwrap_or(1.0)
                })
                .sum();
            Outcome::success(json!({"item_count": items.len(), "subtotal": subtotal}))
        },
    );
    r.register(
        "Ecommerce::StepHandlers::ProcessPaymentHandler",
        |step: StepContext| async move {
            let token = step.message.task_context["payment_info"]["token"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let attempt = step.message.attempt;
            if token == "tok_timeout_twice" && attempt <= 2 {
                return Outcome::Retryable {
                    message: format!("payment gateway timeout (attempt {attempt})"),
                    error_code: Some("GATEWAY_TIMEOUT".into()),
                    retry_after: Some(Duration::from_millis(200)),
                };
            }
            if token == "tok_declined" {
                return Outcome::permanent("card declined by issuer", "CARD_DECLINED");
            }
            let subtotal = step
                .dependency("validate_cart")
                .and_then(|v| v["subtotal"].as_f64())
                .unwrap_or(0.0);
            let tier = tier(&step);
            let discount = if tier == "premium" { 0.1 } else { 0.0 };
            Outcome::success(json!({
                "payment_id": format!("pay_{}", &step.message.step_uuid[24..]),
                "amount_charged": (subtotal * (1.0 - discount) * 100.0).round() / 100.0,
                "discount": discount,
                "tier": tier,
                "attempts_needed": attempt,
            }))
        },
    );
    r.register(
        "Ecommerce::StepHandlers::UpdateInventoryHandler",
        |step: StepContext| async move {
            Outcome::success(json!({"reserved_items": items(&step).len()}))
        },
    );
    r.register(
        "Ecommerce::StepHandlers::CreateOrderHandler",
        |step: StepContext| async move {
            let inventory = step
                .dependency("update_inventory")
                .cloned()
                .unwrap_or(Value::Null);
            Outcome::success(json!({
                "order_number": format!("ORD-{}", &step.message.task_uuid[24..]),
                "inventory": inventory,
            }))
        },
    );
    r.register("Ecommerce::StepHandlers::SendConfirmationHandler", |step: StepContext| async move {
        let email = step.message.task_context["customer_info"]["email"].as_str().unwrap_or("").to_string();
        let order = step.dependency("create_order").and_then(|o| o["order_number"].as_str()).unwrap_or("").to_string();
        Outcome::success(json!({"sent_to": email, "order_number": order, "premium": tier(&step) == "premium"}))
    });
    r
}
