"""Dual Path Networks (Chen et al. 2017): channel bookkeeping, timm parameter counts, identity and
lesion semantics, 'b' variant, gate behaviour, timm key mapping (experiments.md section 5.4)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from _helpers import randomize_bn
import reslab
from reslab.models import default_input_size
from reslab.models.dpn import (
    DPN,
    DPNSpec,
    DPNStageSpec,
    DualPathState,
    convert_dpn_b,
    from_timm_dpn,
    to_timm_dpn,
)

# huggingface/pytorch-image-models results (papers.md section 8), 1000 classes.
TIMM_PARAMS = {"dpn68": 12_611_602, "dpn92": 37_668_392, "dpn98": 61_570_728, "dpn107": 86_917_800,
               "dpn131": 79_254_504}


def _tiny(b: bool = False, num_classes: int = 5) -> DPN:
    spec = DPNSpec((DPNStageSpec(3, 16, 8, 4, 1), DPNStageSpec(2, 24, 8, 6, 2)), groups=4, stem="cifar",
                   stem_chs=8, b=b)
    return DPN(spec, num_classes=num_classes)




def _x(n: int = 2, c: int = 3, hw: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, c, hw, hw, generator=torch.Generator().manual_seed(seed))


def _state(n: int, resid: int, dense: int, hw: int, seed: int = 1) -> DualPathState:
    g = torch.Generator().manual_seed(seed)
    return DualPathState(torch.randn(n, resid, hw, hw, generator=g), torch.randn(n, dense, hw, hw, generator=g))


# ---- sizes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TIMM_PARAMS))
def test_parameter_counts_equal_timm(name):
    with torch.device("meta"):
        model = reslab.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == TIMM_PARAMS[name]


def test_b_variant_has_the_same_parameter_count():
    with torch.device("meta"):
        assert sum(p.numel() for p in reslab.create_model("dpn68", b=True).parameters()) == TIMM_PARAMS["dpn68"]


@pytest.mark.parametrize("name,final", [("dpn92", 2688), ("dpn68", 832), ("cifar_dpn92", 2688),
                                        ("cifar_dpn26", 2560)])
def test_final_channels_and_feature_info_match_stage_outputs(name, final):
    with torch.device("meta"):
        model = reslab.create_model(name)
        size = default_input_size(name)
        outs = model.forward_stages(torch.empty(1, *size))
        logits = model(torch.empty(2, *size))
    assert model.num_features == final == model.feature_info[-1]["num_chs"]
    for info, out in zip(model.feature_info, outs):
        assert out.shape[1] == info["num_chs"]
        assert size[1] // out.shape[2] == info["reduction"]
    assert logits.shape == (2, model.num_classes)


def test_registry_input_sizes():
    assert default_input_size("dpn131") == (3, 224, 224)
    assert default_input_size("cifar_dpn26") == (3, 32, 32)
    assert {"dpn68", "dpn92", "dpn98", "dpn107", "dpn131"} <= set(reslab.list_models("dpn*"))


def test_jth_block_outputs_bw_plus_j_plus_2_inc_channels():
    model = _tiny().eval()
    seen: list[tuple[int, int, int, int]] = []
    for unit in model.residual_units():
        unit.register_forward_hook(
            lambda m, i, o: seen.append((m.stage, m.index, o.resid.shape[1], o.dense.shape[1])))
    model(_x())
    assert len(seen) == 5
    for si, ui, resid, dense in seen:
        st = model.spec.stages[si]
        j = ui + 1  # j = 1 for the first block of a stage
        assert resid == st.bw and dense == (j + 2) * st.inc
    assert [u.downsample for u in model.residual_units()] == [True, False, False, True, False]


# ---- block semantics --------------------------------------------------------------------------
def test_zeroed_c1x1_c_makes_a_normal_block_the_identity_plus_zero_dense():
    model = randomize_bn(_tiny())
    unit = model.stages[0].units[1]
    with torch.no_grad():
        unit.branch.c1x1_c.conv.weight.zero_()
    s = _state(2, 16, 12, 8)
    for train in (True, False):
        unit.train(train)
        out = unit(s)
        assert isinstance(out, DualPathState)
        assert torch.equal(out.resid, s.resid)
        assert torch.equal(out.dense, torch.cat((s.dense, torch.zeros(2, 4, 8, 8)), 1))


def test_normal_block_adds_residual_and_concatenates_dense():
    model = randomize_bn(_tiny()).eval()
    unit = model.stages[0].units[2]
    s = _state(2, 16, 16, 8)
    inc = unit.branch(torch.cat(s, 1))
    out = unit(s)
    torch.testing.assert_close(out.resid, s.resid + inc.resid)
    assert torch.equal(out.dense[:, :16], s.dense) and torch.equal(out.dense[:, 16:], inc.dense)
    assert not torch.equal(inc.dense, torch.zeros_like(inc.dense))  # the test above is not vacuous


def _count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_lesion_of_a_normal_unit():
    model = randomize_bn(_tiny()).eval()
    unit = model.stages[1].units[1]
    s = _state(2, 24, 18, 4)
    calls = _count_calls(unit.branch)
    unit.lesioned = True
    out = unit(s)
    assert calls[0] == 0  # the branch was not computed
    assert torch.equal(out.resid, s.resid)
    assert torch.equal(out.dense, torch.cat((s.dense, torch.zeros(2, 6, 4, 4)), 1))


def test_lesion_of_a_projection_unit_keeps_the_projection():
    model = randomize_bn(_tiny()).eval()
    unit = model.stages[1].units[0]
    s = _state(2, 16, 20, 8)
    proj = unit.shortcut(torch.cat(s, 1))
    assert proj.resid.shape[1] == 24 and proj.dense.shape[1] == 12  # bw, 2 * inc
    unit.lesioned = True
    out = unit(s)
    assert torch.equal(out.resid, proj.resid)
    assert torch.equal(out.dense, torch.cat((proj.dense, torch.zeros(2, 6, 4, 4)), 1))


def test_every_unit_can_be_lesioned_in_a_whole_network():
    model = randomize_bn(_tiny()).eval()
    x = _x()
    y = model(x)
    for unit in model.residual_units():
        unit.lesioned = True
        assert model(x).shape == y.shape
        unit.lesioned = False
    assert torch.equal(model(x), y)


def test_test_time_stochastic_depth_scales_both_increments():
    model = randomize_bn(_tiny()).eval()
    unit = model.stages[0].units[1]
    s = _state(2, 16, 12, 8)
    inc = unit.branch(torch.cat(s, 1))
    unit.sd_mode, unit.survival_prob, unit.sd_scale = "batch", 0.25, "test"
    out = unit(s)
    torch.testing.assert_close(out.resid, s.resid + 0.25 * inc.resid)
    torch.testing.assert_close(out.dense, torch.cat((s.dense, 0.25 * inc.dense), 1))
    # A closed training gate equals the lesion: zero dense increment.
    unit.train()
    unit.survival_prob = 0.0
    out = unit(s)
    assert torch.equal(out.resid, s.resid) and torch.equal(out.dense[:, 12:], torch.zeros(2, 4, 8, 8))


def test_row_mode_masks_both_slices_per_sample():
    model = randomize_bn(_tiny()).train()
    unit = model.stages[0].units[1]
    unit.sd_mode, unit.survival_prob = "row", 0.5
    unit.gate_generator = torch.Generator().manual_seed(3)
    s = _state(16, 16, 12, 4)
    out = unit(s)
    dropped = [i for i in range(16) if torch.equal(out.resid[i], s.resid[i])]
    assert 0 < len(dropped) < 16
    for i in dropped:
        assert torch.equal(out.dense[i, 12:], torch.zeros(4, 4, 4))


# ---- 'b' variant ------------------------------------------------------------------------------
def test_b_variant_is_the_same_function_and_round_trips():
    model = randomize_bn(_tiny()).double().eval()
    ref = copy.deepcopy(model.state_dict())
    x = _x().double()
    y = model(x)
    convert_dpn_b(model, True)
    keys = set(model.state_dict())
    assert "stages.0.units.1.branch.c1x1_c1.weight" in keys and "stages.0.units.1.branch.c1x1_c.bn.weight" in keys
    assert "stages.0.units.1.branch.c1x1_c.conv.weight" not in keys
    torch.testing.assert_close(model(x), y, rtol=1e-12, atol=1e-12)
    convert_dpn_b(model, False)
    state = model.state_dict()
    assert list(state) == list(ref) and all(torch.equal(state[k], ref[k]) for k in ref)
    fresh_b = _tiny(b=True)
    assert set(fresh_b.state_dict()) == keys


# ---- model contract ---------------------------------------------------------------------------
def test_forward_backward_every_parameter_gets_a_gradient():
    model = _tiny()
    model(_x()).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_grad_checkpointing_same_output_and_gradients_with_stochastic_depth():
    def run(ckpt: bool):
        torch.manual_seed(0)
        model = _tiny().train()
        gen = torch.Generator().manual_seed(7)
        for u in model.residual_units():
            u.sd_mode, u.survival_prob, u.gate_generator = "batch", 0.5, gen
        model.set_grad_checkpointing(ckpt)
        y = model(_x(4))
        y.square().sum().backward()
        return y.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    y0, g0 = run(False)
    y1, g1 = run(True)
    torch.testing.assert_close(y1, y0)
    assert len(g0) == len(g1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b)


def test_head_contract():
    model = _tiny().eval()
    x = _x()
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features, 4, 4)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    assert len(model.residual_units()) == 5
    assert [u.global_index for u in model.residual_units()] == list(range(5))


def test_bad_configurations_raise_value_error():
    with pytest.raises(ValueError, match="divisible by groups"):
        DPNSpec((DPNStageSpec(1, 16, 10, 4, 1),), groups=4)
    with pytest.raises(ValueError, match="stem"):
        DPNSpec((DPNStageSpec(1, 16, 8, 4, 1),), groups=4, stem="bogus")
    with pytest.raises(ValueError, match="num_classes"):
        DPN(DPNSpec((DPNStageSpec(1, 16, 8, 4, 1),), groups=4), num_classes=0)


# ---- pretrained-weight mapping ----------------------------------------------------------------
def test_timm_key_mapping_round_trip_and_layout():
    with torch.device("meta"):
        model = reslab.create_model("dpn68")
    sd = model.state_dict()
    timm_sd = to_timm_dpn(sd)
    assert timm_sd["classifier.weight"].shape == (1000, 832, 1, 1)
    for k in ("features.conv1_1.conv.weight", "features.conv2_1.c1x1_w_s1.conv.weight",
              "features.conv3_1.c1x1_w_s2.bn.running_var", "features.conv4_12.c3x3_b.conv.weight",
              "features.conv5_3.c1x1_c.bn.bias", "features.conv5_bn_ac.bn.weight"):
        assert k in timm_sd
    back = from_timm_dpn(timm_sd)
    assert list(back) == list(sd) and all(back[k].shape == sd[k].shape for k in sd)
    with pytest.raises(ValueError, match="unexpected key"):
        from_timm_dpn({"fc.weight": torch.zeros(1)})


@pytest.mark.parametrize("timm_name,b", [("dpn68", False), ("dpn68b", True)])
def test_outputs_equal_timm_dpn68_with_the_same_weights(timm_name, b):
    # Runs where timm is installed (e.g. PYTHONPATH=. TIMM_VENV/bin/python -m pytest tests/test_dpn.py).
    timm = pytest.importorskip("timm")
    ref = randomize_bn(timm.create_model(timm_name, pretrained=False)).double()
    ours = reslab.create_model("dpn68", b=b).double()
    assert set(to_timm_dpn(ours.state_dict())) == set(ref.state_dict())
    ours.load_state_dict(from_timm_dpn(ref.state_dict()), strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for train in (False, True):
        ref.train(train)
        ours.train(train)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x), rtol=1e-10, atol=1e-10)
