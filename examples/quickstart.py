"""Enqueue a few jobs, one of them flaky, and watch the embedded worker run them.

    python examples/quickstart.py

Jobs live in ``demo.db`` (SQLite) unless RELIABLE_DATABASE_URL says otherwise.
"""

from __future__ import annotations

import logging
import os

import tenacity

from reliable import JobFailed, NonRetriable, Reliable

rel = Reliable(os.environ.get("RELIABLE_DATABASE_URL", "sqlite:///demo.db"))

attempts_seen: dict[str, int] = {}


@rel.task(retries=3, backoff=tenacity.wait_exponential(multiplier=0.2))
def send_receipt(order_id: int, email: str) -> dict[str, object]:
    """Pretend to call an email provider that fails twice before it answers."""
    attempts_seen[email] = attempts_seen.get(email, 0) + 1
    if attempts_seen[email] < 3:
        raise ConnectionError(f"provider unavailable (try {attempts_seen[email]})")
    return {"order": order_id, "sent_to": email, "tries": attempts_seen[email]}


@rel.task
def add(a: int, b: int) -> int:
    return a + b


@rel.task(retries=5)
def charge(amount: int) -> str:
    if amount <= 0:
        raise NonRetriable(f"cannot charge {amount}")
    return f"charged {amount}"


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    handles = [
        send_receipt.enqueue(42, "ada@example.com"),
        add.enqueue(2, 3),
        charge.enqueue(0),
        charge.enqueue(10, idempotency_key="order-42-charge"),
        charge.enqueue(10, idempotency_key="order-42-charge"),  # the same job again
    ]
    rel.start_worker(threads=2)
    try:
        for handle in handles:
            try:
                outcome = f"succeeded: {handle.result(timeout=30)!r}"
            except JobFailed as exc:
                outcome = f"failed: {exc}"
            info = rel.get_job(handle.id)
            print(f"{info.task:<13} job {info.id[:8]}  attempts={info.attempts}  {outcome}")
    finally:
        rel.stop_worker()
        rel.close()


if __name__ == "__main__":
    main()
