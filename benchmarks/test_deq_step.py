"""`python -m benchmarks.deq_step` runs end to end (ours only, one timed call per row)."""

import pytest

from benchmarks import deq_step


@pytest.mark.slow
def test_deq_step_prints_every_row(capsys):
    deq_step.main(["--steps", "1", "--no-torchdeq"])
    out = capsys.readouterr().out
    for name in ("phantom backward", "Neumann backward", deq_step.FORWARD, deq_step.CELL_VJP):
        assert name in out
    assert "the solver's own work" in out


def test_markdown_derives_the_solvers_own_work():
    table = deq_step.markdown([(deq_step.FORWARD, 75.0, 56.0), (deq_step.CELL, 35.0, 15.0)])
    assert "| forward solve less the cell (the solver's own work) | 40.0 | 41.0 | 0.98 |" in table
    # Without a peer: its column stays empty.
    table = deq_step.markdown(
        [(deq_step.FORWARD, 75.0, float("nan")), (deq_step.CELL, 35.0, float("nan"))]
    )
    assert "| forward solve less the cell (the solver's own work) | 40.0 | - | - |" in table
