"""Per-user records: items, users and data sets, and the strict field readers every loader uses.

A malformed record raises a `DataError` that names the file, the record and the field, because a
silently skipped record would skew a personalization result.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from common.io import DataError


@dataclass(frozen=True)
class Item:
    """One history item or query; `output` is exactly what a model should produce."""

    id: str
    input: str
    output: str
    date: float | None = None


# Query groups a data set may mark its queries with, each scored apart as well as in total: the
# behaviour-shift study's queries on a topic the user's history covers, and on one it does not. A
# fixed vocabulary, since the names travel in evaluate replies (common/protocol.py).
IN_HISTORY = "in-history"
SHIFTED = "shifted"
QUERY_GROUPS = (IN_HISTORY, SHIFTED)


@dataclass
class User:
    user_id: str
    history: list[Item]
    queries: list[Item]
    query_groups: dict[str, str] = field(default_factory=dict)  # query id -> one of QUERY_GROUPS

    def query_group(self, query: Item) -> str | None:
        return self.query_groups.get(query.id)


@dataclass
class Dataset:
    task: str
    users: list[User]
    source: str


_TYPE_NAMES = {str: "a string", list: "a list", dict: "an object"}


def require(record: Any, key: str, kind: type, where: str) -> Any:
    """The field `key` of a JSON object, checked to be of `kind`."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    if key not in record:
        raise DataError(f"{where}: missing field '{key}' (expected {_TYPE_NAMES[kind]})")
    value = record[key]
    if not isinstance(value, kind):
        raise DataError(f"{where}: field '{key}' must be {_TYPE_NAMES[kind]}, got {type(value).__name__}")
    return value


def require_id(record: Any, key: str, where: str) -> str:
    """An id field: a non-empty string, or an integer (some LaMP files use numbers)."""
    if isinstance(record, dict) and isinstance(record.get(key), int) and not isinstance(record[key], bool):
        return str(record[key])
    value = require(record, key, str, where)
    if not value.strip():
        raise DataError(f"{where}: field '{key}' must be a non-empty id")
    return value


def parse_date(record: Mapping[str, Any], where: str) -> float | None:
    """Optional 'date': unix seconds or an ISO 8601 date (naive dates are taken as UTC)."""
    value = record.get("date")
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            pass
        else:
            return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()
    raise DataError(f"{where}: field 'date' must be a unix time or an ISO 8601 date, got {value!r}")
