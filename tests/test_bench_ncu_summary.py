"""bench.ncu_summary on a small export in ncu's `--page source --csv` shape (no GPU, no ncu)."""

from bench import ncu_summary

HEADER = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed",
          "stall_long_sb", "stall_wait", "stall_long_sb (Not Issued)"]
ROWS = [["0x0", "  LDC R1, c[0x0][0x28]", "2", "10", "0", "2", "0"],
        ["0x10", "  SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R2", "1", "10", "1", "0", "1"],
        ["0x20", "  @P0 BRA 0x0", "7", "40", "6", "1", "6"]]


def write(tmp_path, lines):
    path = tmp_path / "sass.csv"
    path.write_text("\n".join(",".join(f'"{c}"' for c in row) for row in lines) + "\n")
    return path


def test_summary_counts_reasons_regions_and_top(tmp_path, capsys):
    path = write(tmp_path, [["Kernel Name", "k"], HEADER, *ROWS])
    assert ncu_summary.main([str(path), "--regions", "0:1", "1:3", "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "3 SASS instructions, 10 warp samples" in out
    assert "stall_long_sb                  7  70.0%" in out  # the Not Issued column is not a reason
    assert "stall_wait                     3  30.0%" in out
    assert "[0, 1)       2 samples  20.0%" in out and "[1, 3)       8 samples  80.0%" in out
    top = out.split("top 1 instructions")[1].splitlines()[1]
    assert top.split()[:3] == ["2", "7", "40"] and "long_sb 6, wait 1" in top


def test_not_a_source_export(tmp_path, capsys):
    path = write(tmp_path, [["Kernel Name", "k"], ["a", "b"]])
    assert ncu_summary.main([str(path)]) == 2
    assert "not an ncu source page export" in capsys.readouterr().err
