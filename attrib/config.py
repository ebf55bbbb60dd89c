"""Where the SDK finds the server and its API key."""

from __future__ import annotations

import os
from pathlib import Path

from attrib.errors import ConfigurationError

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_DATA_DIR = "./attrib-data"


def resolve_base_url(base_url: str | None = None) -> str:
    """``base_url`` if given, else ``ATTRIB_URL``, else ``http://127.0.0.1:8000``."""
    return (base_url or os.environ.get("ATTRIB_URL") or DEFAULT_URL).rstrip("/")


def key_file() -> Path:
    """The key file that the embedded server writes on its first start: ``$ATTRIB_DATA_DIR/api-key``."""
    return Path(os.environ.get("ATTRIB_DATA_DIR") or DEFAULT_DATA_DIR) / "api-key"


def resolve_api_key(api_key: str | None = None) -> str:
    """``api_key`` if given, else ``ATTRIB_API_KEY``, else the data directory's key file."""
    if api_key:
        return api_key
    from_env = os.environ.get("ATTRIB_API_KEY")
    if from_env:
        return from_env.strip()
    path = key_file()
    if path.is_file():
        return path.read_text().strip()
    raise ConfigurationError(
        f"no API key: pass api_key=, set ATTRIB_API_KEY, or start `attrib serve` once (it writes {path})"
    )
