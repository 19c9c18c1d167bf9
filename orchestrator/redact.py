"""Keep credentials out of logs, printed URIs and the spec copy logged to MLflow."""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
SECRET_KEY = re.compile(
    r"(secret|token|password|passwd|credential|api[_-]?key|access[_-]?key)", re.IGNORECASE
)
_USERINFO = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<pw>[^@/\s]+)@", re.IGNORECASE
)
_QUERY = re.compile(
    r"(?P<key>[?&][^=&\s]*(?:token|secret|password|key|signature)[^=&\s]*=)"
    r"[^&\s]+",
    re.IGNORECASE,
)


def redact_text(text: str) -> str:
    """Mask passwords in ``scheme://user:pass@host`` and secret-looking query parameters."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return _QUERY.sub(lambda m: f"{m['key']}{MASK}", text)


def redact(value: Any) -> Any:
    """A copy of a nested mapping/list with secret-looking keys masked and URIs cleaned."""
    if isinstance(value, dict):
        return {
            k: MASK if isinstance(k, str) and SECRET_KEY.search(k) and v is not None else redact(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value
