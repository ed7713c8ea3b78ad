"""Names of the Locust stats entries, shared by the locustfile and the readers of Locust's CSV.

Kept apart from the locustfile because importing locust monkey-patches the whole process for
gevent; the CLI, the report and the tests only need these names.
"""
from __future__ import annotations

EXAMPLES = "EXAMPLES"  # one entry per image sent (attempts); failed when its request failed
CORRECT = "CORRECT"  # one entry per image answered with its true label (goodput); never failed
USER_CLASSES = {"rest": "RestUser", "grpc": "GrpcUser"}


def request_entry(protocol: str, model: str) -> tuple[str, str]:
    """(type, name) of the prediction requests' entry in Locust's stats."""
    return ("POST", f"/predictions/{model}") if protocol == "rest" else ("gRPC", f"Predictions/{model}")
