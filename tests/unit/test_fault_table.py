"""benchmarks/faults.py's pure parts: rows in -> markdown out, pytest's summary, JUnit failures."""

from benchmarks.faults import (COLUMNS, attribute, failed_tests, fault_table, sectioned_tables, summary_line,
                               with_failed_tests)

FULL = dict(fault="worker killed", what_was_done="SIGKILL x2", expected="every pair once", pairs_lost=0,
            pairs_repeated=0, recovery_s=3.25, passed=True)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_one_line_per_row_in_column_order_with_a_header():
    lines = fault_table([FULL, {**FULL, "fault": "second"}]).splitlines()
    assert _cells(lines[0]) == list(COLUMNS.values())
    assert lines[1] == "|" + "---|" * len(COLUMNS)
    assert _cells(lines[2]) == ["worker killed", "SIGKILL x2", "every pair once", "0", "0", "3.25", "pass"]
    assert _cells(lines[3])[0] == "second" and len(lines) == 4


def test_a_missing_or_empty_field_shows_as_a_dash():
    (row,) = fault_table([dict(fault="disk full", pairs_lost=0, recovery_s=None, expected="")]).splitlines()[2:]
    assert _cells(row) == ["disk full", "-", "-", "0", "-", "-", "-"]


def test_a_failed_row_is_marked_in_its_result_and_its_name():
    (row,) = fault_table([{**FULL, "passed": False, "pairs_lost": 3}]).splitlines()[2:]
    cells = _cells(row)
    assert cells[0] == "**FAIL** worker killed" and cells[-1] == "**FAIL**" and cells[3] == "3"


def test_text_cannot_break_the_table_and_floats_are_short():
    (row,) = fault_table([{**FULL, "what_was_done": "a | b\nc", "recovery_s": 12.0}]).splitlines()[2:]
    assert "a \\| b c" in row and "| 12 |" in row and len(_cells(row.replace("\\|", "/"))) == len(COLUMNS)


def test_summary_line_is_pytests_last_one():
    output = "collected 3 items\n...\n=== short test summary info ===\nFAILED x\n" \
             "================= 2 passed, 1 failed in 81.20s (0:01:21) =================\n"
    assert summary_line(output) == "2 passed, 1 failed in 81.20s (0:01:21)"
    assert summary_line("killed\n") == "(no pytest summary line)"


def test_a_failed_test_without_a_row_gets_a_failed_row_of_its_own():
    junit = """<testsuites><testsuite>
      <testcase classname="tests.integration.test_faults_load" name="test_a"/>
      <testcase classname="tests.integration.test_faults_load" name="test_b"><failure message="x"/></testcase>
      <testcase classname="tests.integration.test_faults_data" name="test_c"><error message="y"/></testcase>
      <testcase classname="tests.integration.test_two_nodes" name="test_d"><skipped message="z"/></testcase>
    </testsuite></testsuites>"""
    failed, skipped = failed_tests(junit)
    assert failed == ["tests.integration.test_faults_load::test_b", "tests.integration.test_faults_data::test_c"]
    assert skipped == ["tests.integration.test_two_nodes::test_d"]
    recorded = [{**FULL, "passed": False, "test": "tests/integration/test_faults_data.py::test_c"}]
    rows = with_failed_tests(recorded, failed)
    assert rows[0] is recorded[0] and len(rows) == 2  # test_c recorded its own (failed) row
    assert rows[1]["fault"] == "test_b" and rows[1]["passed"] is False
    assert "**FAIL** test_b" in fault_table(rows)


def test_rows_are_attributed_to_the_test_that_recorded_them():
    rows = [{"fault": "a"}, {"fault": "b"}, {"fault": "c"}]
    marks = [{"test": "f.py::t1", "rows": 1}, {"test": "f.py::t2", "rows": 1}, {"test": "f.py::t3", "rows": 3}]
    assert [r.get("test") for r in attribute(rows, marks)] == ["f.py::t1", "f.py::t3", "f.py::t3"]
    assert attribute(rows, [])[2] == {"fault": "c"}  # no marks (the run was killed): rows kept as they are


def test_rows_of_a_section_get_their_own_titled_table_after_the_others():
    rows = [{**FULL, "fault": "pickle in checkpoint", "section": "security"}, FULL]
    text = sectioned_tables(rows)
    untitled, titled = text.split("### ")
    assert "worker killed" in untitled and "pickle" not in untitled
    assert titled.startswith("Security") and "pickle in checkpoint" in titled and "worker killed" not in titled
