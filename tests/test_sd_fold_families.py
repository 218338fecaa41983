"""The test->train scaling converter on the multi-path families (DPN, merge-and-run)."""
from __future__ import annotations

import pytest
import torch

import reslab
from reslab.regularize.stochastic_depth import fold_survival_into_branch, unfold_survival_from_branch


@pytest.mark.parametrize("name,kw", [("cifar_dpn26", {}), ("cifar_dpn26", {"b": True}), ("cifar_dmrnet_mr1", {})])
def test_fold_survival_keeps_eval_outputs(name: str, kw: dict) -> None:
    torch.manual_seed(0)
    m = reslab.create_model(name, stochastic_depth={"final_survival": 0.5, "scale": "test"}, **kw).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y = m(x)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    fold_survival_into_branch(m)
    assert all(u.sd_scale == "train" for u in m.residual_units())
    torch.testing.assert_close(m(x), y, rtol=1e-10, atol=1e-12)
    assert any(not torch.equal(before[k], v) for k, v in m.state_dict().items())  # weights really changed
    unfold_survival_from_branch(m)
    torch.testing.assert_close(m(x), y, rtol=1e-10, atol=1e-12)
