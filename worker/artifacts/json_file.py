"""Small JSON files of an upload (config.json, tokenizer_config.json, index files): bounded size and nesting."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from worker.artifacts.errors import ArtifactError

_STRING_LITERAL = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def json_depth(raw: bytes) -> int:
    """How deeply arrays and objects nest (0 for a scalar), counted without parsing."""
    depth = deepest = 0
    for byte in _STRING_LITERAL.sub(b"", raw):
        if byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest


def read_json_object(path: Path, *, field: str, max_bytes: int, max_depth: int) -> dict[str, Any]:
    size = path.stat().st_size
    if size > max_bytes:
        raise ArtifactError(f"the `{field}` file is {size:,} bytes (at most {max_bytes:,})", field=field)
    raw = path.read_bytes()
    depth = json_depth(raw)
    if depth > max_depth:
        raise ArtifactError(f"the `{field}` file nests {depth} levels deep (at most {max_depth})", field=field)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ArtifactError(f"the `{field}` file is not valid JSON: {exc}", field=field) from None
    if not isinstance(data, dict):
        raise ArtifactError(f"the `{field}` file is not a JSON object", field=field)
    return data
