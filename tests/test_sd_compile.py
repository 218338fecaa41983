"""Stochastic depth under torch.compile: the gates stay in eager Python, a closed gate still skips
its branch, gate patterns keep varying, and the number of compilations stays bounded (per unit
layout, not per gate pattern)."""
from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F

import reslab
from reslab.models.stochastic_depth import apply_stochastic_depth
from reslab.models.units import _COMPILED_CALLERS, compile_units

dynamo = pytest.importorskip("torch._dynamo")
if not torch._dynamo.is_dynamo_supported():  # pragma: no cover - platform dependent
    pytest.skip("torch.compile is not supported on this platform", allow_module_level=True)


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given and runs them as traced."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, inputs: Any) -> Callable[..., Any]:
        self.graphs += 1
        return gm.forward


@pytest.fixture(autouse=True)
def _fresh_callers():
    _COMPILED_CALLERS.clear()
    torch._dynamo.reset()
    yield
    _COMPILED_CALLERS.clear()
    torch._dynamo.reset()


def _sd_model(name: str = "cifar_resnet56") -> torch.nn.Module:
    torch.manual_seed(0)
    model = reslab.create_model(name).train()
    apply_stochastic_depth(model, {"final_survival": 0.5, "seed": 11})
    return model


def test_gates_vary_skip_is_real_and_compilations_are_bounded() -> None:
    backend = CountingBackend()
    model = _sd_model()
    ref = copy.deepcopy(model)  # eager twin with the same gate stream
    units = model.residual_units()
    assert compile_units(model, backend=backend) == len(units) == 27
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    patterns, after_first = set(), None
    for step in range(8):
        model.zero_grad(set_to_none=True)
        out = model(x)
        F.cross_entropy(out, y).backward()
        pattern = tuple(bool(u.last_gate_open) for u in units)
        patterns.add(pattern)
        # A closed gate is a real skip: none of its branch's parameters took part.
        for u, opened in zip(units, pattern):
            grads = [p.grad for p in u.branch.parameters()]
            assert all(g is not None for g in grads) if opened else all(g is None for g in grads)
        out_ref = ref(x)
        assert tuple(bool(u.last_gate_open) for u in ref.residual_units()) == pattern
        assert torch.equal(out, out_ref)
        if step == 0:
            after_first = backend.graphs
    assert len(patterns) >= 4  # the gates kept varying
    # One graph per unit layout, compiled the first time a unit of that layout runs, never again:
    # three stages give five layouts (stage 1; per later stage a downsampling and a plain one).
    layouts = {u.compiled_branch for u in units}
    assert len(layouts) == 5 and 1 <= after_first <= backend.graphs == 5
    model.eval()
    with torch.no_grad():
        model(x)
    assert backend.graphs <= 10  # eval mode adds at most one graph per layout


def test_compile_count_does_not_grow_with_depth() -> None:
    counts = {}
    for name in ("cifar_resnet20", "cifar_resnet110"):
        backend = CountingBackend()
        _COMPILED_CALLERS.clear()
        torch._dynamo.reset()
        model = _sd_model(name)
        compile_units(model, backend=backend)
        for _ in range(3):
            model(torch.randn(2, 3, 16, 16)).sum().backward()
        counts[name] = backend.graphs
    assert counts["cifar_resnet110"] == counts["cifar_resnet20"] <= 5


def test_deepcopy_runs_its_own_weights_and_compile_can_be_undone() -> None:
    model = _sd_model("cifar_resnet20").eval()
    compile_units(model, backend=CountingBackend())
    x = torch.randn(2, 3, 16, 16)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
        assert not torch.equal(twin(x), model(x))
        keys = list(model.state_dict())
        assert compile_units(model, enable=False) == 0
        assert all(u.compiled_branch is None for u in model.residual_units())
        assert list(model.state_dict()) == keys


def test_unhashable_compile_arguments_are_accepted() -> None:
    model = _sd_model("cifar_resnet20").eval()
    backend = CountingBackend()
    compile_units(model, backend=backend, options={})
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    assert backend.graphs >= 1


def test_compile_units_refuses_a_model_without_units() -> None:
    with pytest.raises(ValueError, match="no residual units"):
        compile_units(torch.nn.Linear(2, 2))


def test_engine_compiles_branches_when_sd_is_on(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """train.compile=true with stochastic depth takes the per-branch path (gates logged per step
    still vary); the inductor backend is swapped for a counting one to keep the test fast."""
    from reslab.train import Callback, load_config, train

    backend = CountingBackend()
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kw: real_compile(fn, backend=backend))

    class Gates(Callback):
        def __init__(self) -> None:
            self.patterns: set[tuple[bool, ...]] = set()
            self.compiled: list[bool] = []

        def step_end(self, model, step):
            units = model.residual_units()
            self.patterns.add(tuple(bool(u.last_gate_open) for u in units))
            self.compiled.append(all(u.compiled_branch is not None for u in units))

    cfg = load_config(None, [
        "model.name=cifar_resnet20", "model.kwargs={stochastic_depth: {final_survival: 0.3, mode: batch}}",
        "data.name=synthetic", "data.num_train=96", "data.num_test=16", "data.image_size=8",
        "train.batch_size=16", "train.epochs=1", "train.compile=true", "train.device=cpu", "train.progress=false",
        "train.tensorboard=false", "eval.batch_size=16"])
    gates = Gates()
    train(cfg, tmp_path / "run", callbacks=[gates])
    assert gates.compiled and all(gates.compiled)
    assert len(gates.patterns) >= 2 and 1 <= backend.graphs <= 10
