import math

from agreement.tables import format_cell, markdown_table


def test_cells_keep_small_values_and_mark_missing_ones():
    assert format_cell(0.12345) == "0.123"
    assert format_cell(0.0012345) == "0.00123"  # not 0.001
    assert format_cell(123456.0) == "1.23e+05"
    assert format_cell(0.0) == "0.000"
    assert format_cell(None) == format_cell(math.nan) == "–"
    assert format_cell(math.inf) == "inf"
    assert format_cell(3) == "3" and format_cell("a / b") == "a / b"
    assert format_cell(0.5, digits=4) == "0.5000"


def test_rows_as_mappings_or_sequences():
    by_name = markdown_table(["method", "acc"], [{"method": "ours", "acc": 0.5}, {"method": "official"}])
    by_position = markdown_table(["method", "acc"], [["ours", 0.5], ["official", ""]])
    assert by_name == by_position == "| method | acc |\n|---|---|\n| ours | 0.500 |\n| official |  |"
