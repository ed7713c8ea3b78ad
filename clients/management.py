"""TorchServe's management API over REST: the one client of it that the project's tools share.

Every call carries the management key and survives its expiry (clients.tokens.KeyRing renews a
refused key and retries once). The health server, the scaler and the launcher ask through this
class; the gRPC client (clients.grpc_client) covers the same API for operators.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import requests

from clients.tokens import KeyRing

PAGE = 1000  # the management API's largest page


class ScalingError(RuntimeError):
    """TorchServe answered a scale request with anything but 200 (its workers did not all start)."""


def ready_workers(description: dict[str, Any]) -> int:
    """READY workers in one model's management description."""
    return sum(worker["status"] == "READY" for worker in description["workers"])


class Management:
    """The management API at ``url`` of the TorchServe whose keys are in ``key_file``.

    The key file is read on first use, not here: TorchServe writes it only once it runs, so a client
    made before the server (the health server, the scaler) would otherwise fail to start.
    """

    def __init__(self, key_file: str | Path, url: str, timeout: float = 10.0, keys: KeyRing | None = None) -> None:
        self.key_file = Path(key_file)
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._keys = keys

    @property
    def keys(self) -> KeyRing:
        if self._keys is None:
            self._keys = KeyRing(self.key_file, self.url, timeout=self.timeout)
        return self._keys

    def request(self, method: str, path: str, timeout: float | None = None, **kwargs: Any) -> requests.Response:
        return self.keys.request("management", method, f"{self.url}{path}", timeout=timeout or self.timeout, **kwargs)

    def get(self, path: str, timeout: float | None = None, **params: Any) -> Any:
        """A GET as JSON; raises on an HTTP error."""
        response = self.request("GET", path, timeout=timeout, params=params)
        response.raise_for_status()
        return response.json()

    def models(self) -> list[str]:
        """Every registered model, page by page."""
        names: list[str] = []
        token: str | None = "0"
        while token is not None:
            page = self.get("/models", limit=PAGE, next_page_token=token)
            names += [model["modelName"] for model in page["models"]]
            token = page.get("nextPageToken")
        return names

    def describe(self, model: str, version: str | None = None) -> list[dict[str, Any]]:
        """The management description of ``model`` (its default version, or ``version``; ``all`` for every one)."""
        return self.get(f"/models/{model}" + (f"/{version}" if version else ""))

    def ready_workers(self, model: str) -> int:
        return ready_workers(self.describe(model)[0])

    def scale(self, model: str, workers: int, timeout: float | None = None) -> None:
        """Run exactly ``workers`` workers of ``model``; returns once they have started."""
        response = self.request("PUT", f"/models/{model}", timeout=timeout,
                                params={"min_worker": workers, "max_worker": workers, "synchronous": "true"})
        if response.status_code != 200:  # 206 "scaling in progress" is not done either
            raise ScalingError(f"scaling {model} to {workers} worker(s): HTTP {response.status_code} "
                               f"{response.text.strip()[:300]}")
