"""JSON files that cmid_jax writes for itself to read back (ArrayRecord manifests, band statistics),
tagged with a `format` so that a wrong or stale file fails with a clear error, not a KeyError."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from cmid_jax.errors import DataError


def read_tagged_json(path: str, fmt: str, required: Sequence[str], what: str) -> dict[str, Any]:
    """The object in `path`, checked for `"format": fmt` and the `required` keys.

    `what` names the file in the errors, e.g. "data.stats='s.json'" or "the manifest 'x/m.json'".
    """
    try:
        with open(path, encoding='utf-8') as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f'{what}: cannot read it ({e})') from e
    found = obj.get('format') if isinstance(obj, dict) else type(obj).__name__
    if found != fmt:
        raise DataError(f'{what} is not a file of format {fmt!r} (its format is {found!r})')
    missing = [k for k in required if k not in obj]
    if missing:
        raise DataError(f'{what} lacks the keys {missing}')
    return obj
