"""The one reader of TorchServe's config.properties, and the properties derived from it.

Every tool (launcher, health server, renewer, scaler, load tester) reads the server's addresses
from here, so that they agree with the config the server actually runs with.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The config this installation serves with: the checkout's config.properties, or in the container image
# (where the project is installed into a venv, without the checkout) the effective one it names in TS_CONFIG.
SHIPPED_CONFIG = Path(os.environ.get("TS_CONFIG") or REPO_ROOT / "config.properties")
LOG_CONFIG_FLAG = "-Dlog4j.configurationFile="


def parse_properties(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line and not line.lstrip().startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def read_properties(path: Path = SHIPPED_CONFIG) -> dict[str, str]:
    return parse_properties(Path(path).read_text())


def render_properties(properties: dict[str, str]) -> str:
    """config.properties text; java.util.Properties reads a backslash as an escape, so it is doubled."""
    return "".join(f"{key}={value}".replace("\\", "\\\\") + "\n" for key, value in properties.items())


def store_only_urls(model_store: Path) -> str:
    """``allowed_urls`` (TorchServe: comma-separated Java regexes) matching only archives in ``model_store``.

    TorchServe's default, ``file://.*|http(s)?://.*``, lets any holder of the management key make the
    server download and run an archive from anywhere (CVE-2023-43654). Archives registered by name
    (``url=cifar10.mar``) are read from the model store and are not URLs, so they stay allowed.
    """
    store = str(model_store)
    if "," in store or "\\E" in store:
        raise ValueError(f"model store path {store!r} cannot be quoted in allowed_urls")
    return f"file://\\Q{store}\\E/[^/]+\\.mar"


def anchored_vmargs(vmargs: str, base: Path) -> str:
    """``vmargs`` with a relative log4j configuration made absolute against ``base`` (the config's directory).

    The shipped config names log4j2.xml relative to the repository root, where the README starts the
    server; an instance started from another working directory must still find it, or the JVM would
    silently fall back to TorchServe's per-request DEBUG logging.
    """
    words = vmargs.split()
    for i, word in enumerate(words):
        if word.startswith(LOG_CONFIG_FLAG) and not Path(word.removeprefix(LOG_CONFIG_FLAG)).is_absolute():
            words[i] = LOG_CONFIG_FLAG + str(base / word.removeprefix(LOG_CONFIG_FLAG))
    return " ".join(words)


def free_port_overrides(base: int) -> dict[str, str]:
    """Ports base..base+4 on loopback for a second instance beside the default one."""
    return {
        "inference_address": f"http://127.0.0.1:{base}",
        "management_address": f"http://127.0.0.1:{base + 1}",
        "metrics_address": f"http://127.0.0.1:{base + 2}",
        "grpc_inference_port": str(base + 3),
        "grpc_management_port": str(base + 4),
    }
