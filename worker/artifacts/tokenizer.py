"""Uploaded tokenizers: a tokenizer.json read by the `tokenizers` library (data only: no code runs), and text
turned into token ids with it (truncation and padding as options)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from worker.artifacts.errors import ArtifactError
from worker.artifacts.json_file import read_json_object

MAX_TOKENIZER_BYTES = 64 * 1024 * 1024
MAX_TOKENIZER_CONFIG_BYTES = 1024 * 1024
MAX_DEPTH = 16


def load_tokenizer(path: Path, field: str = "tokenizer") -> Tokenizer:
    size = path.stat().st_size
    if size > MAX_TOKENIZER_BYTES:
        raise ArtifactError(f"tokenizer.json is {size:,} bytes (at most {MAX_TOKENIZER_BYTES:,})", field=field)
    read_json_object(path, field=field, max_bytes=MAX_TOKENIZER_BYTES, max_depth=MAX_DEPTH)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - the library raises plain Exceptions for a bad file
        raise ArtifactError(
            f"tokenizer.json could not be loaded by the tokenizers library: {exc}", field=field
        ) from None


def check_tokenizer_config(path: Path, field: str = "tokenizer_config") -> dict[str, Any]:
    config = read_json_object(path, field=field, max_bytes=MAX_TOKENIZER_CONFIG_BYTES, max_depth=MAX_DEPTH)
    if "auto_map" in config:
        raise ArtifactError(
            "tokenizer_config.json has `auto_map`: custom tokenizer code is never run", field=f"{field}.auto_map"
        )
    return config


def special_token_id(
    tokenizer: Tokenizer, tokenizer_config: dict[str, Any] | None, names: tuple[str, ...]
) -> int | None:
    """The id of the first of ``names`` (``pad_token``, ``eos_token``...) that tokenizer_config sets."""
    for name in names:
        value = (tokenizer_config or {}).get(name)
        content = value.get("content") if isinstance(value, dict) else value
        if isinstance(content, str):
            token_id = tokenizer.token_to_id(content)
            if token_id is not None:
                return int(token_id)
    return None
