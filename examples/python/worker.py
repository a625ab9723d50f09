#!/usr/bin/env python3
"""A pg_tasker worker in Python: the plain protocol (docs/worker-protocol.md) in
~100 lines, a model for a worker in any language.

    tasker.read_steps(namespace, worker_id, qty, vt)   -> messages (poison quarantined)
    handler(message)                                    -> outcome
    tasker.submit_result(step_uuid, status, ...)        -> applied, or ignored if late
    LISTEN tasker.wake_channel(ns) + tasker.worker_idle -> woken when work arrives

It serves the e-commerce checkout (examples/templates/ecommerce_process_order.yaml)
with handlers written here, until SIGTERM/SIGINT:

    python3 examples/python/worker.py --dsn "host=/tmp port=5432 user=postgres dbname=postgres" \
        --namespace ecommerce

Errors: a lost connection, a server restart (57P01), a deadlock (40P01) or a
serialization failure (40001) is retried with backoff on a fresh connection,
and results not yet submitted are submitted then (the database ignores one it
already has). A refused result (22xxx, P0002, 42501) is logged with its
SQLSTATE and dropped: its lease expires and the step follows its retry policy.
Misconfiguration (authentication, unknown database or namespace, no
extension) ends the worker at start-up with exit code 1 and the cause.
"""
import argparse
import json
import os
import signal
import socket
import sys
import time

import psycopg
from psycopg import sql
from psycopg import errors


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



def log(line):
    print(f"[python-worker] {line}", file=sys.stderr, flush=True)


class Misconfigured(Exception):
    """A cause retrying cannot fix."""


# retried on a fresh connection (psycopg raises OperationalError for a lost
# connection, 57P01 and the 40xxx transaction rollbacks, 53xxx resources)
TRANSIENT = (psycopg.OperationalError,)
FATAL_AT_CONNECT = ("authentication failed", "does not exist", "no pg_hba.conf entry")


def submission(msg, outcome, started, worker_id):
    metadata = {"attempt": msg["attempt"], "worker_id": worker_id,
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
    return (msg["step_uuid"], status, json.dumps(result) if result is not None else None,
            json.dumps(error) if error is not None else None, json.dumps(metadata))


def submit(conn, args):
    """True when the database took the result (or refused it for good)."""
    try:
        conn.execute(
            "SELECT tasker.submit_result(%s::uuid, %s, %s::jsonb, %s::jsonb, %s::jsonb)", args)
        return True
    except TRANSIENT:
        raise
    except psycopg.Error as exc:
        log(f"result for step {args[0]} refused ({exc.sqlstate} {exc}); dropped, its lease expires")
        return True


def run_step(msg):
    handler = HANDLERS.get(msg["handler"]["callable"])
    if handler is None:
        log(f"NO HANDLER for callable {msg['handler']['callable']!r} (step {msg['step_name']}): "
            "failing it permanently (UNKNOWN_HANDLER)")
        return ("permanent", "no handler for " + msg["handler"]["callable"], "UNKNOWN_HANDLER")
    try:
        return handler(msg)
    except Exception as exc:  # a bug in a handler is a retryable failure
        return ("retry", f"handler raised {exc!r}", "HANDLER_EXCEPTION", None)


def connect(dsn, namespace, first):
    """A connection that serves `namespace`, and its wake-up channel."""
    try:
        conn = psycopg.connect(dsn, autocommit=True, application_name="python-worker")
    except psycopg.OperationalError as exc:
        if first and any(m in str(exc) for m in FATAL_AT_CONNECT):
            raise Misconfigured(f"cannot connect: {str(exc).strip()}") from exc
        raise
    if first:
        ext = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_tasker'").fetchone()
        if ext is None:
            raise Misconfigured("the pg_tasker extension is not installed in this database "
                                "(CREATE EXTENSION pg_tasker CASCADE)")
    try:
        channel = conn.execute("SELECT tasker.wake_channel(%s)", (namespace,)).fetchone()[0]
    except errors.UndefinedObject as exc:
        conn.close()
        raise Misconfigured(f"namespace {namespace!r} is not registered in this database "
                            "(register a template of it first)") from exc
    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
    return conn


def flush(conn, unsent):
    """Submits the results not sent yet, oldest first; one is removed only
    once the database took it (a TRANSIENT error leaves it for the next
    connection)."""
    while unsent:
        submit(conn, unsent[0])
        unsent.pop(0)


def serve(conn, args, worker_id, unsent, stop):
    """Reads, runs, submits until stopped; raises TRANSIENT errors."""
    flush(conn, unsent)  # results a lost connection kept from the database
    idle = False
    while not stop:
        rows = conn.execute(
            "SELECT msg_id, message FROM tasker.read_steps(%s, %s, 10, %s)",
            (args.namespace, worker_id, args.visibility_timeout)).fetchall()
        for _msg_id, msg in rows:
            started = time.monotonic()
            unsent.append(submission(msg, run_step(msg), started, worker_id))
            flush(conn, unsent)
        if rows:
            if idle:
                conn.execute("SELECT tasker.worker_idle(%s, %s, false)", ([args.namespace], worker_id))
                idle = False
        elif not idle:
            # registered, then one more read: a message sent before the
            # registration sends no notification
            conn.execute("SELECT tasker.worker_idle(%s, %s, true)", ([args.namespace], worker_id))
            idle = True
        else:
            for _ in conn.notifies(timeout=args.poll_interval, stop_after=1):
                pass
    if idle:
        conn.execute("SELECT tasker.worker_idle(%s, %s, false)", ([args.namespace], worker_id))


def main():
    parser = argparse.ArgumentParser(description="pg_tasker worker for the e-commerce workflow")
    parser.add_argument("--dsn", default=os.environ.get("DATABASE_URL", ""),
                        help="libpq connection string (default: DATABASE_URL, then PG* variables)")
    parser.add_argument("--namespace", default="ecommerce")
    parser.add_argument("--visibility-timeout", type=int, default=30)
    parser.add_argument("--poll-interval", type=float, default=5.0,
                        help="longest idle wait without a notification, seconds")
    args = parser.parse_args()
    worker_id = f"python-{socket.gethostname()}-{os.getpid()}"
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))

    unsent, first, wait = [], True, 0.1
    while not stop:
        try:
            with connect(args.dsn, args.namespace, first) as conn:
                if first:
                    log(f"worker {worker_id} serving {args.namespace!r}")
                first, wait = False, 0.1
                serve(conn, args, worker_id, unsent, stop)
        except Misconfigured as exc:
            log(str(exc))
            sys.exit(1)
        except TRANSIENT as exc:
            log(f"database error ({getattr(exc, 'sqlstate', None) or 'connection'}: "
                f"{str(exc).strip()}); {len(unsent)} results kept, retrying in {wait:.1f}s")
            time.sleep(wait)
            wait = min(wait * 2, 5.0)


if __name__ == "__main__":
    main()
