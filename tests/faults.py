"""The fault table: each fault test writes one JSON line to $PIXELBERT_FAULT_ROWS, if it is set.

    record_fault({"fault": "S3 down 2 s mid-epoch", "what_was_done": "...", "expected": "...",
                  "pairs_lost": 0, "pairs_repeated": 0, "recovery_s": 1.2, "passed": True})

Record the row before asserting, with `passed` the test's own verdict, so failures are rows too.
A row may name its `section` ("security" for the hostile-input tests); the table groups by it.
"""

from __future__ import annotations

import json
import os

FIELDS = ("fault", "what_was_done", "expected", "pairs_lost", "pairs_repeated", "recovery_s", "passed")
OPTIONAL = ("section",)


def record_fault(row: dict) -> None:
    missing = [field for field in FIELDS if field not in row]
    if missing:
        raise ValueError(f"fault row without {', '.join(missing)}")
    path = os.environ.get("PIXELBERT_FAULT_ROWS")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps({field: row[field] for field in FIELDS + OPTIONAL if field in row}) + "\n")
