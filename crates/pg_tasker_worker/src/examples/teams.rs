//! Blog post 04: namespaces per team. Two teams own a `process_refund`
//! workflow each, in their own namespace and queue: `payments` (the
//! gateway refund) and `customer_success` (the support-ticket refund that
//! ends by calling the payments team's workflow, here simulated).

use serde_json::json;

use crate::{Outcome, Registry, StepContext};

fn amount(step: &StepContext) -> f64 {
    step.message.task_context["amount"].as_f64().unwrap_or(0.0)
}

pub fn registry() -> Registry {
    let mut r = Registry::new();
    // payments
    r.register("Payments::ValidateRefundHandler", |step: StepContext| async move {
        if amount(&step) <= 0.0 {
            return Outcome::permanent("refund amount must be positive", "INVALID_AMOUNT");
        }
        Outcome::success(json!({"team": "payments", "namespace": step.message.namespace, "amount": amount(&step)}))
    });
    r.register("Payments::ProcessGatewayRefundHandler", |step: StepContext| async move {
        Outcome::success(json!({"team": "payments", "refund_id": format!("rf_{}", &step.message.task_uuid[24..])}))
    });
    r.register(
        "Payments::UpdatePaymentRecordsHandler",
        |_s: StepContext| async move {
            Outcome::success(json!({"team": "payments", "ledger": "updated"}))
        },
    );
    r.register("Payments::NotifyCustomerHandler", |_s: StepContext| async move { Outcome::success(json!({"team": "payments", "notified": true})) });
    // customer success
    r.register("CustomerSuccess::ValidateRefundRequestHandler", |step: StepContext| async move {
        Outcome::success(json!({"team": "customer_success", "namespace": step.message.namespace, "ticket": step.message.task_context["ticket_id"]}))
    });
    r.register(
        "CustomerSuccess::CheckRefundPolicyHandler",
        |step: StepContext| async move {
            Outcome::success(
                json!({"team": "customer_success", "within_policy": amount(&step) <= 500.0}),
            )
        },
    );
    r.register("CustomerSuccess::GetManagerApprovalHandler", |step: StepContext| async move {
        let needed = !step.dependency("check_refund_policy").and_then(|v| v["within_policy"].as_bool()).unwrap_or(false);
        Outcome::success(json!({"team": "customer_success", "manager_approval_needed": needed, "approved": true}))
    });
    r.register(
        "CustomerSuccess::ExecuteRefundWorkflowHandler",
        |_s: StepContext| async move {
            Outcome::success(
                json!({"team": "customer_success", "delegated_to": "payments/process_refund"}),
            )
        },
    );
    r.register(
        "CustomerSuccess::UpdateTicketStatusHandler",
        |_s: StepContext| async move {
            Outcome::success(json!({"team": "customer_success", "ticket_status": "resolved"}))
        },
    );
    r
}
