"""bench.common helpers that every bench's tables go through (CPU)."""
from bench.common import print_table


def test_missing_cells_print_a_dash_so_columns_stay_aligned(capsys):
    rows = [{"a": "1", "b": "22", "c": "3"}, {"a": "4", "c": "6"}]  # row 2 has no "b"
    text = print_table(rows, ["a", "b", "c"])
    lines = text.splitlines()
    assert [line.split() for line in lines] == [["a", "b", "c"], ["1", "22", "3"], ["4", "-", "6"]]
    assert len({len(line) for line in lines}) == 1
    assert capsys.readouterr().out.strip() == text
