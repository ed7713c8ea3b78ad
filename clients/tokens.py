"""TorchServe's access keys, kept valid past their expiry, for every client this project ships.

TorchServe writes ``key_file.json`` (inference, management and API keys) into its start directory;
the inference and management keys expire ``token_expiration_min`` after they were made, and only a
call to the token API (``/token?type=...`` on the management address, with the API key, which never
expires) makes new ones, rewriting the file. A client that keeps its first key stops working after
the expiry, so every client holds a :class:`KeyRing` instead and, when TorchServe refuses a key,
calls :meth:`KeyRing.renew` and retries once.

A replica behind its authenticating proxy (server.proxy) is called with a client key instead: a file
holding one key per line (a Kubernetes Secret), the first line being the one to send. A ring reads
either kind of file, and re-reads it whenever it changes, so that rewriting the file moves every
client of it to the new key without one refused request (a client-key rotation, docs/DEPLOY.md).

Renewing replaces the key for every client of the server at once, so many clients noticing the
same expiry must renew it once, not once each (each renewal would invalidate the key the previous
one just handed out). An exclusive lock on the key file serialises renewals across threads and
processes (Locust workers, the gRPC CLI, the tests), and inside it a client first re-reads the file:
if the key there is no longer the one that was refused, another client already renewed it.
"""
from __future__ import annotations

import fcntl
import json
import threading
import time
from pathlib import Path
from typing import Literal

import requests

Kind = Literal["inference", "management"]
KINDS: tuple[Kind, ...] = ("inference", "management")
# What TorchServe answers an expired, wrong or missing key with: HTTP 400 (REST) or gRPC
# PERMISSION_DENIED, both carrying this message; a replica's proxy refuses a client key with the same
# message as HTTP 401 or gRPC UNAUTHENTICATED.
REFUSAL_MESSAGE = "Token Authorization failed"
REFUSAL_STATUSES = (400, 401)
READ_ATTEMPTS = 20  # TorchServe rewrites the file in place, so a reader may catch it half written


def parse_keys(text: str) -> dict[str, str]:
    """``{"inference": key, "management": key, "API": key}`` from a key_file.json, or ``{"inference": key}``
    from a client-key file (its first key; the others are accepted too, during a rotation)."""
    if not text.lstrip().startswith("{"):
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        return {"inference": lines[0]}
    keys = json.loads(text)
    return {"inference": keys["inference"]["key"], "management": keys["management"]["key"], "API": keys["API"]["key"]}


def read_key_file(path: str | Path) -> dict[str, str]:
    """The keys of a key_file.json or a client-key file (see :func:`parse_keys`).

    Retries briefly on a half-written file (TorchServe truncates and rewrites it on every renewal).
    """
    for attempt in range(READ_ATTEMPTS):
        try:
            return parse_keys(Path(path).read_text())
        except (ValueError, KeyError, TypeError, IndexError):
            if attempt == READ_ATTEMPTS - 1:
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def is_refusal(status: int, body: str | bytes) -> bool:
    """Whether an HTTP answer is TorchServe (or a replica's proxy) refusing the key, rather than the request."""
    text = body.decode("utf-8", "replace") if isinstance(body, (bytes, bytearray)) else body
    return status in REFUSAL_STATUSES and REFUSAL_MESSAGE in text


def request_new_key(management_url: str, api_key: str, kind: Kind, timeout: float = 10.0) -> None:
    """Ask TorchServe's token API for a new ``kind`` key; TorchServe writes it into key_file.json.

    The caller holds the key file's lock (see KeyRing.renew): every renewal invalidates the old key.
    """
    response = requests.post(f"{management_url.rstrip('/')}/token", params={"type": kind},
                             headers=bearer(api_key), timeout=timeout)
    response.raise_for_status()


class KeyRing:
    """The current keys of one TorchServe, renewed through its token API when they expire.

    ``key_file`` is the server's key_file.json; ``management_url`` its management address (where the
    token API lives). Without a management URL the ring can still pick up keys another client renewed.
    Thread-safe and cheap to share: one ring per process and server is enough.
    """

    def __init__(self, key_file: str | Path, management_url: str | None = None, timeout: float = 10.0) -> None:
        self.key_file = Path(key_file)
        self.management_url = management_url.rstrip("/") if management_url else None
        self.timeout = timeout
        self._lock = threading.Lock()
        self._seen = self._signature()
        self._keys = read_key_file(self.key_file)

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            stat = self.key_file.stat()  # follows a Secret volume's symlink swap to the new file
        except OSError:
            return None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def __getitem__(self, kind: Kind) -> str:
        """The ``kind`` key now: the file is read again when it changed (one stat per call)."""
        signature = self._signature()
        if signature != self._seen:
            try:
                keys = parse_keys(self.key_file.read_text())
            except (OSError, ValueError, KeyError, TypeError, IndexError):
                return self._keys[kind]  # caught half written: keep the last keys, read it again next call
            with self._lock:
                self._keys, self._seen = keys, signature
        return self._keys[kind]

    def renew(self, kind: Kind, refused: str) -> str:
        """A valid ``kind`` key after TorchServe refused ``refused``: another client's renewal or a new one."""
        with self._lock, open(self.key_file) as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # held until the file is closed
            self._keys = read_key_file(self.key_file)
            if self._keys[kind] == refused and self.management_url is not None and "API" in self._keys:
                request_new_key(self.management_url, self._keys["API"], kind, self.timeout)
                self._keys = read_key_file(self.key_file)  # TorchServe rewrote it before answering
            return self._keys[kind]

    def request(self, kind: Kind, method: str, url: str, session: requests.Session | None = None,
                **kwargs) -> requests.Response:
        """``requests`` call with the ``kind`` key; on a refused key, renew and retry once.

        An ``Authorization`` header in ``headers`` is sent as given (tests send wrong keys on purpose).
        """
        send = (session or requests).request
        extra = kwargs.pop("headers", None) or {}
        key = self[kind]
        response = send(method, url, headers=bearer(key) | extra, **kwargs)
        if is_refusal(response.status_code, response.content) and "Authorization" not in extra:
            response = send(method, url, headers=bearer(self.renew(kind, key)) | extra, **kwargs)
        return response
