"""`python -m benchmarks.deq_step` runs end to end (ours only, one timed call per row)."""

import jax
import jax.numpy as jnp
import numpy as np
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


def test_the_torch_twin_computes_our_model():
    """torchdeq's model is ours written in torch: with our weights, its injection and
    cell give ours to float32 rounding (a different activation - torch's GELU is the
    erf form by default, ours the tanh form - would show here)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchdeq")
    from fixedpoint_deq.mnist.build import make_model

    ours = make_model(deq_step._our_config("phantom"))
    twin = deq_step._torch_model("phantom")
    with torch.no_grad():
        for mine, theirs in (
            (ours.project, twin.project),
            (ours.project_norm, twin.project_norm),
            (ours.deq.cell.conv, twin.conv),
            (ours.deq.cell.norm, twin.norm),
        ):
            assert mine.bias is not None and theirs.bias is not None
            theirs.weight.copy_(torch.from_numpy(np.array(mine.weight)))
            theirs.bias.copy_(torch.from_numpy(np.array(mine.bias).reshape(-1)))
    images = deq_step._data()[0][:4]
    z = np.random.default_rng(1).normal(size=(4, 28, 28, deq_step.WIDTH)).astype(np.float32)
    x = jax.vmap(ours.inject)(jnp.asarray(images))
    out = jax.vmap(ours.deq.cell)(jnp.asarray(z), x)

    def nchw(a):
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(a), -1, 1)))

    with torch.no_grad():
        x_twin = twin.inject(torch.from_numpy(images))
        out_twin = twin.cell(nchw(z), x_twin)
    np.testing.assert_allclose(x_twin.numpy(), nchw(x).numpy(), rtol=0, atol=2e-5)
    np.testing.assert_allclose(out_twin.numpy(), nchw(out).numpy(), rtol=0, atol=2e-5)
