"""The fault table: run the fault tests, one row per fault, written as a results file.

    .venv/bin/python benchmarks/faults.py                  # every fault test file present
    .venv/bin/python benchmarks/faults.py --tests tests/integration/test_faults_load.py

Runs `pytest` on tests/integration/test_faults_*.py and tests/integration/test_two_nodes.py
(those that exist) with PIXELBERT_FAULT_ROWS naming a temporary file: each fault test appends
its row there (tests/faults.py: `record_fault(dict(fault=..., what_was_done=..., expected=...,
pairs_lost=..., pairs_repeated=..., recovery_s=..., passed=...))`); this module, loaded into
pytest as a plugin, notes after each test how many rows there are, so each row is known by
its test. A test that fails or errors with no row of its own gets a failed row under its name. Writes
benchmarks/results/faults_<hardware>_<date>.{md,json}: the table, pytest's summary line, the
total time and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import hardware_tag, write_results  # noqa: E402

TEST_FILES = "tests/integration/test_faults_*.py", "tests/integration/test_two_nodes.py"
# Fault checks that ride on another test's job rather than start one of their own
EXTRA_TESTS = ("tests/integration/test_pretrain.py::"
               "test_the_mlflow_server_holds_the_runs_metrics_config_model_and_registry_entry",)
COLUMNS = {"fault": "fault", "what_was_done": "what was done", "expected": "expected",
           "pairs_lost": "pairs lost", "pairs_repeated": "pairs repeated",
           "recovery_s": "time to recover (s)", "passed": "result"}


def _cell(field: str, value) -> str:
    if field == "passed":
        return "-" if value is None else "pass" if value is True else "**FAIL**"
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        value = f"{value:,.2f}".rstrip("0").rstrip(".")
    return str(value).replace("|", "\\|").replace("\n", " ")


def fault_table(rows: list[dict]) -> str:
    """Markdown, one line per row in COLUMNS' order: a missing field shows as "-", a failed row
    (`passed` False) is marked **FAIL** in its result and before its fault's name."""
    lines = ["| " + " | ".join(COLUMNS.values()) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [_cell(field, row.get(field)) for field in COLUMNS]
        if row.get("passed") is False:
            cells[0] = "**FAIL** " + cells[0]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


SECTION_TITLES = {"security": "Security: hostile input is refused, and nothing runs, is read or is written "
                               "outside its place"}


def sectioned_tables(rows: list[dict]) -> str:
    """The rows without a `section` as one table, then one titled table per section, in order of first use."""
    sections = list(dict.fromkeys(row.get("section") for row in rows))
    parts = []
    for section in sorted(sections, key=lambda name: name is not None):
        chosen = [row for row in rows if row.get("section") == section]
        title = SECTION_TITLES.get(section, section) if section else None
        parts.append((f"### {title}\n\n" if title else "") + fault_table(chosen))
    return "\n\n".join(parts)


def summary_line(output: str) -> str:
    """pytest's last `==== 5 passed, 1 failed in 80.12s ====` line, without the bars."""
    found = re.findall(r"^=+ (.*\bin [\d.]+s.*?) =+$", output, re.MULTILINE)
    return found[-1] if found else "(no pytest summary line)"


def failed_tests(junit_xml: str) -> tuple[list[str], list[str]]:
    """(failed or errored test ids, skipped test ids) from pytest's --junitxml report."""
    failed, skipped = [], []
    for case in ET.fromstring(junit_xml).iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(test)
        elif case.find("skipped") is not None:
            skipped.append(test)
    return failed, skipped


def _test_name(test: str) -> str:
    """`test_x` from `tests/.../f.py::test_x (call)` (PYTEST_CURRENT_TEST) or `tests.f::test_x` (JUnit)."""
    return test.rsplit("::", 1)[-1].split(" (")[0]


def pytest_runtest_logfinish(nodeid: str, location) -> None:
    """Plugin hook (`-p benchmarks.faults`): after each test, its id and the rows so far."""
    rows, marks = os.environ.get("PIXELBERT_FAULT_ROWS"), os.environ.get("PIXELBERT_FAULT_MARKS")
    if rows and marks:
        count = len(Path(rows).read_text().splitlines()) if Path(rows).exists() else 0
        with open(marks, "a", encoding="utf-8") as out:
            out.write(json.dumps({"test": nodeid, "rows": count}) + "\n")


def attribute(rows: list[dict], marks: list[dict]) -> list[dict]:
    """Each row with `test` set to the test that recorded it (the first mark counting past it)."""
    out, start = [], 0
    for mark in marks:
        out += [{**row, "test": mark["test"]} for row in rows[start:mark["rows"]]]
        start = max(start, mark["rows"])
    return out + rows[start:]


def with_failed_tests(rows: list[dict], failed: list[str]) -> list[dict]:
    """The rows, plus a failed row for each failed test that no row names (in its field `test`)."""
    named = {_test_name(row["test"]) for row in rows if row.get("test")}
    return rows + [{"fault": _test_name(test), "what_was_done": f"{test} failed before recording its row",
                    "passed": False, "test": test} for test in failed if _test_name(test) not in named]


def machine() -> dict:
    import psutil
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"hardware": hardware_tag(), "cpu": cpu, "cores": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "os": platform.platform(), "python": platform.python_version()}


def run_tests(files: list[str], timeout: float) -> dict:
    """pytest on `files` in its own process; its output echoed, the rows it recorded read back."""
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
        rows_file, marks_file, junit = (Path(tmp) / name for name in ("rows.jsonl", "marks.jsonl", "junit.xml"))
        command = [sys.executable, "-m", "pytest", *files, f"--junitxml={junit}", "-p", "benchmarks.faults",
                   "-p", "no:cacheprovider"]
        env = {**os.environ, "PIXELBERT_FAULT_ROWS": str(rows_file), "PIXELBERT_FAULT_MARKS": str(marks_file),
               "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0"}
        started = time.perf_counter()
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        output = []
        for line in proc.stdout:
            print(line, end="", flush=True)
            output.append(line)
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            returncode = proc.wait()
        seconds = time.perf_counter() - started
        rows, marks = ([json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                       if path.exists() else [] for path in (rows_file, marks_file))
        rows = attribute(rows, marks)
        failed, skipped = failed_tests(junit.read_text()) if junit.exists() else ([], [])
    return {"command": " ".join(["pytest", *files]), "returncode": returncode, "seconds": seconds,
            "summary": summary_line("".join(output)), "rows": with_failed_tests(rows, failed),
            "failed_tests": failed, "skipped_tests": skipped}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", nargs="+", default=None,
                        help=f"test files (default: those of {', '.join(TEST_FILES)} that exist)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before pytest is stopped")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)

    files = args.tests or (sorted(str(p.relative_to(REPO)) for pattern in TEST_FILES for p in REPO.glob(pattern))
                           + [test for test in EXTRA_TESTS if (REPO / test.split("::")[0]).exists()])
    if not files:
        parser.error("no fault test files found")
    run = run_tests(files, args.timeout)
    host = machine()
    failures = [r for r in run["rows"] if r.get("passed") is not True]
    body = (f"`{run['command']}` on {host['cores']} cores ({host['cpu']}, {host['memory_gb']} GB, "
            f"{host['os']}, Python {host['python']}).\n\n"
            + sectioned_tables(run["rows"])
            + f"\n\n**pytest:** `{run['summary']}`; total {run['seconds']:.1f} s (pytest's process, from start "
            f"to exit). {len(run['rows'])} rows, {len(failures)} not passed.\n")
    if run["failed_tests"]:
        body += "\nFailed: " + ", ".join(f"`{t}`" for t in run["failed_tests"]) + "\n"
    if run["skipped_tests"]:
        body += "\nSkipped: " + ", ".join(f"`{t}`" for t in run["skipped_tests"]) + "\n"
    kwargs = {"out_dir": args.out} if args.out else {}
    md = write_results("faults", "Faults: what was done, what happened, how long recovery took", body,
                       {"config": {"tests": files, "command": run["command"], "machine": host},
                        "rows": run["rows"], "summary": run["summary"], "total_s": round(run["seconds"], 1),
                        "returncode": run["returncode"], "failed_tests": run["failed_tests"],
                        "skipped_tests": run["skipped_tests"]}, **kwargs)
    print(md.read_text())
    return 0 if run["returncode"] == 0 and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
