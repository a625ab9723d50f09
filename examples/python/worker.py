#!/usr/bin/env python3
"""A pg_tasker worker in Python: proof that a worker needs only pgmq and
tasker.submit_result (docs/worker-protocol.md).

It serves the e-commerce checkout (examples/templates/ecommerce_process_order.yaml)
with handlers written here, until SIGTERM/SIGINT:

    python3 examples/python/worker.py --dsn "host=/tmp port=5432 user=postgres dbname=postgres" \
        --namespace ecommerce
"""
import argparse
import json
import signal
import time

import psycopg


def validate_cart(msg):
    items = msg["task_context"].get("cart_items") or []
    if not items:
        return ("permanent", "cart is empty", "EMPTY_CART")
    subtotal = sum(i.get("price", 10.0) * i.get("quantity", 1) for i in items)
    return ("success", {"item_count": len(items), "subtotal": subtotal, "worker": "python"})


def process_payment(msg):
    token = msg["task_context"]["payment_info"]["token"]
    if token == "tok_declined":
        return ("permanent", "card declined by issuer", "CARD_DECLINED")
    if token == "tok_timeout_twice" and msg["attempt"] <= 2:
        return ("retry", f"payment gateway timeout (attempt {msg['attempt']})", "GATEWAY_TIMEOUT", 0.2)
    subtotal = msg["dependency_results"]["validate_cart"]["subtotal"]
    premium = msg["task_context"]["customer_info"].get("tier") == "premium"
    return ("success", {"payment_id": "pay_py_" + msg["step_uuid"][24:],
                        "amount_charged": round(subtotal * (0.9 if premium else 1.0), 2),
                        "worker": "python"})


def update_inventory(msg):
    return ("success", {"reserved_items": len(msg["task_context"]["cart_items"]), "worker": "python"})


def create_order(msg):
    return ("success", {"order_number": "ORD-" + msg["task_uuid"][24:], "worker": "python"})


def send_confirmation(msg):
    return ("success", {"sent_to": msg["task_context"]["customer_info"]["email"],
                        "order_number": msg["dependency_results"]["create_order"]["order_number"],
                        "worker": "python"})


HANDLERS = {
    "Ecommerce::StepHandlers::ValidateCartHandler": validate_cart,
    "Ecommerce::StepHandlers::ProcessPaymentHandler": process_payment,
    "Ecommerce::StepHandlers::UpdateInventoryHandler": update_inventory,
    "Ecommerce::StepHandlers::CreateOrderHandler": create_order,
    "Ecommerce::StepHandlers::SendConfirmationHandler": send_confirmation,
}


def submit(conn, msg, outcome, started):
    metadata = {"attempt": msg["attempt"], "worker_id": "python-worker",
                "execution_time_ms": (time.monotonic() - started) * 1000}
    kind = outcome[0]
    if kind == "success":
        status, result, error = "success", outcome[1], None
    elif kind == "retry":
        status, result = "failure", None
        error = {"message": outcome[1], "error_code": outcome[2], "retryable": True,
                 "retry_after_seconds": outcome[3]}
    else:
        status, result = "failure", None
        error = {"message": outcome[1], "error_code": outcome[2], "retryable": False}
    conn.execute(
        "SELECT tasker.submit_result(%s::uuid, %s, %s::jsonb, %s::jsonb, %s::jsonb)",
        (msg["step_uuid"], status, json.dumps(result) if result is not None else None,
         json.dumps(error) if error is not None else None, json.dumps(metadata)),
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--namespace", default="ecommerce")
    parser.add_argument("--visibility-timeout", type=int, default=30)
    args = parser.parse_args()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))

    with psycopg.connect(args.dsn, autocommit=True) as conn:
        queue = conn.execute("SELECT tasker.queue_name(%s)", (args.namespace,)).fetchone()[0]
        idle = 0.001
        while not stop:
            rows = conn.execute("SELECT msg_id, message FROM pgmq.read(%s, %s, 10)",
                                (queue, args.visibility_timeout)).fetchall()
            for _msg_id, msg in rows:
                started = time.monotonic()
                handler = HANDLERS.get(msg["handler"]["callable"])
                if handler is None:
                    outcome = ("permanent", "no handler for " + msg["handler"]["callable"], "UNKNOWN_HANDLER")
                else:
                    try:
                        outcome = handler(msg)
                    except Exception as exc:  # a bug in a handler is a retryable failure
                        outcome = ("retry", f"handler raised {exc!r}", "HANDLER_EXCEPTION", None)
                submit(conn, msg, outcome, started)
            if rows:
                idle = 0.001
            else:
                time.sleep(idle)
                idle = min(idle * 2, 0.1)


if __name__ == "__main__":
    main()
