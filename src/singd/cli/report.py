"""Rendering result rows as a Markdown table, JSON or CSV (``--format``).

Rows are dicts of plain values. Tables format numbers for people; JSON and CSV
keep them raw for scripts (non-finite floats become ``null`` in JSON, which has
no NaN).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

#: Names accepted by :func:`render`.
FORMATS = ("table", "json", "csv")


@dataclasses.dataclass(frozen=True)
class Column:
    """A table column: the row key, its header, and a format spec for numbers.

    Attributes:
        key: Key in each row dict.
        header: Column header in tables (CSV and JSON use ``key``).
        spec: ``format`` spec for floats in tables (e.g. ``".3f"``).
    """

    key: str
    header: str
    spec: str = ""


def _cell(value: Any, spec: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return format(value, spec)
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """A GitHub-flavoured Markdown table (numbers right-aligned)."""
    cells = [[_cell(row.get(c.key), c.spec) for c in columns] for row in rows]
    widths = [max([len(c.header)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [
        any(isinstance(row.get(c.key), (int, float)) for row in rows)
        and not any(isinstance(row.get(c.key), str) for row in rows)
        for c in columns
    ]

    def line(values: Sequence[str]) -> str:
        padded = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * (w - 1) + ":" if num else "-" * w for w, num in zip(widths, numeric, strict=True)]
    return "\n".join([line([c.header for c in columns]), line(rule), *map(line, cells)])


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def to_json(obj: Any) -> str:
    """Strict JSON (non-finite floats as ``null``), indented."""
    return json.dumps(_json_safe(obj), indent=2, allow_nan=False)


def to_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """CSV with the column keys as header and raw values."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([c.key for c in columns])
    for row in rows:
        writer.writerow(["" if row.get(c.key) is None else row.get(c.key) for c in columns])
    return buffer.getvalue().rstrip("\n")


def render(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[Column],
    fmt: str,
    json_extra: Mapping[str, Any] | None = None,
) -> str:
    """Render rows in ``fmt`` (one of :data:`FORMATS`).

    Args:
        rows: Result rows.
        columns: The columns of tables and CSV (JSON keeps every key of the rows).
        fmt: ``"table"``, ``"json"`` or ``"csv"``.
        json_extra: More top-level entries for JSON output (``{"rows": …}`` is added).

    Raises:
        ValueError: For an unknown format.
    """
    if fmt == "table":
        return markdown_table(rows, columns)
    if fmt == "csv":
        return to_csv(rows, columns)
    if fmt == "json":
        return to_json({**(json_extra or {}), "rows": [dict(r) for r in rows]})
    raise ValueError(f"Unknown format {fmt!r}. Valid: {', '.join(FORMATS)}.")
