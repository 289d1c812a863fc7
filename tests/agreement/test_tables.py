import math
import statistics

import pytest

from agreement.tables import format_cell, format_mean_std, markdown_table, mean_std


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


def test_mean_std_is_the_sample_standard_deviation():
    values = [0.71, 0.74, 0.78]
    assert mean_std(values) == pytest.approx((statistics.fmean(values), statistics.stdev(values)), abs=1e-15)
    assert mean_std([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError, match="at least one value"):
        mean_std([])
    assert format_mean_std([1.0, 2.0, 3.0], digits=2) == "2.00 ± 1.00"
    assert format_mean_std([0.01, 0.03], digits=3, signed=True) == "+0.020 ± 0.014"
    assert format_mean_std([-0.01, -0.03], digits=3, signed=True) == "-0.020 ± 0.014"
