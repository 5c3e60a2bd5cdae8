"""The report's command line refuses what would run nothing or fail late, with an
argparse-style error (exit status 2) that says what to pass instead. Cheap: nothing is
run or written."""

import pytest

from . import report


def _fails(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        report.main(argv + ["--threads", "0", "--quiet", "--no-plots"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m benchmarks.report")
    return err


def test_a_glob_that_matches_nothing_names_the_list_and_its_names(tmp_path, capsys):
    out = tmp_path / "out"
    err = _fails(["--smoke", "--problems", "nothing*", "--out", str(out)], capsys)
    assert "argument --problems: 'nothing*' matches no problem of the smoke grid" in err
    assert "linear-n50-rho0.9" in err and "bratu2d-N12-lam6" in err
    assert "argument --solvers" not in err
    err = _fails(["--smoke", "--solvers", "bogus", "--out", str(out)], capsys)
    assert "argument --solvers: 'bogus' matches no solver of the smoke grid" in err
    assert "fp.Anderson(m=5)" in err and "scipy.anderson(M=5)" in err
    # Both lists at once; and where another grid has a match, the flag that selects it.
    err = _fails(
        ["--smoke", "--problems", "linear-n100-*", "--solvers", "fp.Anderson(m=10)"]
        + ["--out", str(out)],
        capsys,
    )
    assert "argument --problems: 'linear-n100-*'" in err and "argument --solvers" in err
    assert "the default grid (neither --smoke nor --full)" in err
    assert "the full grid (--full)" in err
    assert not out.exists()


def test_out_naming_a_file_is_an_option_error(tmp_path, capsys):
    existing = tmp_path / "report.md"
    existing.write_text("keep")
    for out in (existing, existing / "sub"):
        err = _fails(["--smoke", "--out", str(out)], capsys)
        assert f"argument --out: {str(existing)!r}" in err and "not a directory" in err
    assert existing.read_text() == "keep"
