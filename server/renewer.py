"""Keeps key_file.json valid for clients that cannot renew keys: renews each key before it expires.

A client renews an expired key through the token API on the management address (docs/OPERATIONS.md).
In the container image the management API listens on the container's loopback only, so a client
outside, reading key_file.json from the mounted working directory, cannot. This loop, started beside
TorchServe by the replica's supervisor (server.supervisor), renews the inference and management keys ``margin`` seconds
before they expire, so the file always holds valid keys. Renewal invalidates the old key at once: a
client refused once re-reads the file and retries (what :class:`clients.tokens.KeyRing` does, even
without a management URL).

With ``--proxy-dir`` (a replica behind its authenticating proxy, server.proxy) it also keeps that
proxy current, checking every ``--sync-interval`` seconds: TorchServe's inference key right after
any renewal (its own or a client's), and the accepted client keys whenever their file (a Secret)
changes. A renewal invalidates the old key at once, so a request the proxy forwarded in the few
milliseconds between the renewal and the push is refused: once per ``token_expiration_min``.

    python -m server.renewer --workdir /var/lib/torchserve --config config.properties
"""
from __future__ import annotations

import argparse
import fcntl
import json
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import requests

from clients.tokens import KINDS, Kind, read_key_file, request_new_key
from server.config import read_properties
from server.proxy import ProxyCommandError, sync

DEFAULT_EXPIRATION_MIN = 60  # TorchServe's token_expiration_min when the config does not set it


def parse_instant(text: str) -> datetime:
    """A Java ``Instant.toString()`` (``2026-11-28T20:26:35.123456789Z``) as an aware datetime."""
    whole, _, fraction = text.rstrip("Z").partition(".")
    return datetime.fromisoformat(whole).replace(tzinfo=timezone.utc) + timedelta(
        microseconds=int((fraction or "0")[:6].ljust(6, "0")))


def renew_due(key_file: Path, management_url: str, margin: timedelta, timeout: float = 10.0) -> list[Kind]:
    """Renew every key that expires within ``margin``; the kinds renewed.

    Holds the same exclusive lock as KeyRing.renew, so a client renewing at the same moment waits and
    then finds the new key instead of renewing it away again.
    """
    with open(key_file) as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        entries = json.loads(key_file.read_text())
        api_key = read_key_file(key_file)["API"]
        now = datetime.now(timezone.utc)
        due = [kind for kind in KINDS if parse_instant(entries[kind]["expiration time"]) - now <= margin]
        for kind in due:
            request_new_key(management_url, api_key, kind, timeout)
    return due


def check_timing(margin: float, interval: float, lifetime: float) -> None:
    """Refuse timings that fail: a key could expire between two checks (margin <= interval), or every
    check would renew keys just made, invalidating each key clients were handed (margin >= lifetime)."""
    if margin <= interval:
        raise ValueError(f"--margin ({margin:.0f} s) must exceed --interval ({interval:.0f} s), "
                         "or a key could expire between two checks")
    if margin >= lifetime:
        raise ValueError(f"--margin ({margin:.0f} s) must be shorter than the keys' lifetime "
                         f"(token_expiration_min: {lifetime:.0f} s), or every check would renew them again")


def renew(key_file: Path, management_url: str, margin: timedelta) -> None:
    """Renew the keys due within ``margin``; failures are logged and left to the next check."""
    try:
        renewed = renew_due(key_file, management_url, margin)
    except (OSError, ValueError, KeyError, requests.RequestException) as error:
        # TorchServe not up yet (no key file, nothing listening) or restarting: try again later.
        print(f"key renewal skipped: {type(error).__name__}", file=sys.stderr, flush=True)
        return
    if renewed:
        print(f"renewed the {' and '.join(renewed)} key(s)", file=sys.stderr, flush=True)


def push(proxy_dir: Path, client_keys: Path, key_file: Path, pushed: dict[str, object]) -> None:
    """TorchServe's current key and the client-key file to the replica's proxy, where they changed."""
    try:
        changed = sync(proxy_dir, client_keys, read_key_file(key_file)["inference"], pushed)
    except (OSError, ValueError, KeyError, ProxyCommandError) as error:
        # The proxy restarting (no socket yet) or the key file half written: next tick.
        print(f"proxy key sync skipped: {type(error).__name__}", file=sys.stderr, flush=True)
        pushed.clear()  # a restarted proxy read its files again; push everything once it answers
        return
    if changed:
        print(f"pushed to the proxy: {', '.join(changed)}", file=sys.stderr, flush=True)


def renew_forever(key_file: Path, management_url: str, margin: timedelta, interval: float,
                  proxy: tuple[Path, Path] | None = None, sync_interval: float = 1.0) -> None:
    """Every ``interval`` seconds, renew the keys due within ``margin``; with ``proxy`` (its directory and the
    client-key file), every ``sync_interval`` seconds push what changed to it."""
    pushed: dict[str, object] = {}
    next_renewal = time.monotonic() + interval
    while True:
        time.sleep(sync_interval if proxy else interval)
        if time.monotonic() >= next_renewal:
            next_renewal = time.monotonic() + interval
            renew(key_file, management_url, margin)
        if proxy:
            push(*proxy, key_file, pushed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.renewer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path.cwd(), help="TorchServe's start directory (key_file.json)")
    parser.add_argument("--config", type=Path, required=True,
                        help="TorchServe's config: its management address and token_expiration_min")
    parser.add_argument("--margin", type=float, default=300, help="renew this many seconds before expiry (default: 300)")
    parser.add_argument("--interval", type=float, default=30, help="seconds between checks (default: 30)")
    parser.add_argument("--proxy-dir", type=Path, help="the replica proxy's directory (its runtime socket and key map)")
    parser.add_argument("--client-keys", type=Path, help="the file of accepted client keys (with --proxy-dir)")
    parser.add_argument("--sync-interval", type=float, default=1.0,
                        help="seconds between checks for keys to push to the proxy (default: 1)")
    args = parser.parse_args(argv)
    if (args.proxy_dir is None) != (args.client_keys is None):
        parser.error("--proxy-dir and --client-keys go together")
    properties = read_properties(args.config)
    lifetime = 60 * float(properties.get("token_expiration_min", DEFAULT_EXPIRATION_MIN))
    try:
        check_timing(args.margin, args.interval, lifetime)
    except ValueError as error:
        parser.error(str(error))
    renew_forever(args.workdir / "key_file.json", properties["management_address"], timedelta(seconds=args.margin),
                  args.interval, (args.proxy_dir, args.client_keys) if args.proxy_dir else None, args.sync_interval)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
