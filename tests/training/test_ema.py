"""Tests of the named-parameter EMA used by the target/ODE branches and the export."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from condistill.training.ema import EMA


def _module(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    m[0].bias.requires_grad_(False)  # a frozen parameter must be ignored
    return m


def _train_step(m, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, generator=g)
    loss = m(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_from_module_tracks_trainable_parameters_only():
    m = _module()
    ema = EMA.from_module(m)
    assert set(ema.state_dict()) == {"0.weight", "2.weight", "2.bias"}
    assert len(ema) == 3
    with pytest.raises(ValueError, match="requires_grad"):
        EMA.from_module(_module().requires_grad_(False))
    with pytest.raises(TypeError, match="named_parameters"):
        EMA(list(m.parameters()))


def test_update_formula_and_decay_bounds():
    p = {"w": torch.tensor([0.0, 10.0])}
    ema = EMA(p)
    ema.update({"w": torch.tensor([10.0, 0.0])}, decay=0.9)
    torch.testing.assert_close(ema.state_dict()["w"], torch.tensor([1.0, 9.0]))
    ema.update({"w": torch.tensor([5.0, 5.0]), "frozen": torch.zeros(1)}, decay=0.0)  # extras ignored
    torch.testing.assert_close(ema.state_dict()["w"], torch.tensor([5.0, 5.0]))
    ema.update({"w": torch.tensor([7.0, 7.0])}, decay=1.0)
    torch.testing.assert_close(ema.state_dict()["w"], torch.tensor([5.0, 5.0]))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="decay"):
            ema.update(p, bad)
    with pytest.raises(KeyError, match="w"):
        ema.update({"v": torch.zeros(2)}, 0.5)
    with pytest.raises(ValueError, match="shape"):
        ema.update({"w": torch.zeros(3)}, 0.5)


def test_ema_tracks_current_weights_not_initial_ones():
    """Guards the published trap of a target branch that reads the initial adapter weights."""
    m = _module()
    initial = {k: v.detach().clone() for k, v in m.named_parameters()}
    ema = EMA.from_module(m)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    for step in range(5):
        _train_step(m, opt, step)
        ema.update(dict(m.named_parameters()), decay=0.5)
    sd = ema.state_dict()
    for name in sd:
        assert not torch.allclose(sd[name], initial[name]), f"EMA of {name} still equals its initial value"
        assert not torch.allclose(sd[name], dict(m.named_parameters())[name])  # and it lags the online weights
    x = torch.randn(5, 3)
    reference = _module()
    reference.load_state_dict({**{k: v for k, v in m.state_dict().items()}, **sd})
    with ema.swapped_in(m):
        with torch.no_grad():
            y_ema = m(x)
    torch.testing.assert_close(y_ema, reference(x).detach())
    with torch.no_grad():
        initial_model = _module()
        assert not torch.allclose(y_ema, initial_model(x))


def _ema_behind(decay: float):
    """A module and its EMA after one EMA update and one more training step: the two now differ."""
    m = _module()
    ema = EMA.from_module(m)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    _train_step(m, opt, 0)
    ema.update(dict(m.named_parameters()), decay=decay)
    _train_step(m, opt, 1)
    return m, ema


def test_swapped_in_restores_exactly_even_on_exception():
    m, ema = _ema_behind(0.9)
    online = {k: v.detach().clone() for k, v in m.named_parameters()}
    params_before = {k: id(v) for k, v in m.named_parameters()}
    with ema.swapped_in(m) as inside:
        assert inside is m
        for name, value in ema.state_dict().items():
            assert torch.equal(dict(m.named_parameters())[name], value)
        assert torch.equal(m[0].bias, online["0.bias"])  # untracked parameters untouched
    for name, p in m.named_parameters():
        assert torch.equal(p, online[name])
    with pytest.raises(RuntimeError, match="boom"):
        with ema.swapped_in(m):
            raise RuntimeError("boom")
    for name, p in m.named_parameters():
        assert torch.equal(p, online[name])
    assert {k: id(v) for k, v in m.named_parameters()} == params_before  # same Parameter objects (optimizer-safe)


def test_bound_swaps_objects_so_a_graph_built_before_it_stays_valid():
    """The online forward, then a no-grad EMA forward, then the online backward (the ODE-from-online order)."""
    m, ema = _ema_behind(0.5)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(3))
    objects = {k: v for k, v in m.named_parameters()}
    online = {k: v.detach().clone() for k, v in objects.items()}

    m.zero_grad()
    m(x).pow(2).mean().backward()
    clean_grads = {k: v.grad.clone() for k, v in objects.items() if v.requires_grad}

    m.zero_grad()
    loss = m(x).pow(2).mean()
    with ema.bound(m) as inside, torch.no_grad():
        assert inside is m
        bound_params = dict(m.named_parameters())
        for name, value in ema.state_dict().items():
            assert torch.equal(bound_params[name], value) and bound_params[name] is not objects[name]
        assert bound_params["0.bias"] is objects["0.bias"]  # untracked parameters stay
        ema_out = m(x)
    loss.backward()
    assert {k: v for k, v in m.named_parameters()} == objects  # the same objects are back
    for name, p in objects.items():
        assert torch.equal(p, online[name])
        if p.requires_grad:
            torch.testing.assert_close(p.grad, clean_grads[name], rtol=0, atol=0)
    with ema.swapped_in(m):
        torch.testing.assert_close(m(x), ema_out, rtol=0, atol=0)

    # the in-place swap in the same order breaks the graph: the reason bound() exists
    loss = m(x).pow(2).mean()
    with ema.swapped_in(m), torch.no_grad():
        m(x)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_copy_to_and_state_dict_round_trip(tmp_path):
    m = _module()
    ema = EMA.from_module(m)
    ema.update({k: v + 1.0 for k, v in m.named_parameters()}, decay=0.5)
    path = tmp_path / "ema.safetensors"
    save_file(ema.state_dict(), str(path))
    other = EMA.from_module(_module(seed=1))
    other.load_state_dict(load_file(str(path)))
    for name, value in ema.state_dict().items():
        assert torch.equal(other.state_dict()[name], value)
    target = _module(seed=2)
    other.copy_to(target)
    for name, value in ema.state_dict().items():
        assert torch.equal(dict(target.named_parameters())[name], value)
    sd = ema.state_dict()
    sd["0.weight"].zero_()  # state_dict returns copies
    assert not torch.equal(ema.state_dict()["0.weight"], sd["0.weight"])


def test_load_state_dict_and_module_mismatch_errors():
    ema = EMA.from_module(_module())
    sd = ema.state_dict()
    with pytest.raises(KeyError, match=r"missing \['2.bias'\]"):
        ema.load_state_dict({k: v for k, v in sd.items() if k != "2.bias"})
    with pytest.raises(KeyError, match=r"unexpected \['extra'\]"):
        ema.load_state_dict({**sd, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        ema.load_state_dict({**sd, "2.bias": torch.zeros(5)})
    wrapped = nn.Sequential(_module())  # names gain a "0." prefix
    with pytest.raises(KeyError, match="no parameters named"):
        with ema.swapped_in(wrapped):
            pass
    with pytest.raises(KeyError, match="no parameters named"):
        ema.copy_to(wrapped)
