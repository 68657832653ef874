import pytest
import torch
from torch import nn

from jmp_ext.train.ema import EMA


def test_ema_matches_recurrence_and_swaps_back():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    ema = EMA(net, decay=0.9)
    expect = [p.detach().clone().double() for p in net.parameters()]
    for _ in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        expect = [0.9 * e + 0.1 * p.detach().double() for e, p in zip(expect, net.parameters())]
    trained = [p.detach().clone() for p in net.parameters()]
    with ema.swap():
        for p, e in zip(net.parameters(), expect):
            torch.testing.assert_close(p.double(), e, rtol=1e-6, atol=1e-6)
    for p, t in zip(net.parameters(), trained):
        assert torch.equal(p, t)


def test_ema_state_roundtrip_and_errors():
    net = nn.Linear(3, 2)
    ema = EMA(net, 0.99)
    state = {k: v + 1 for k, v in ema.state_dict().items()}
    other = EMA(net, 0.99)
    other.load_state_dict(state)
    assert all(torch.equal(a, state[n]) for n, a in other.state_dict().items())
    with pytest.raises(ValueError, match="lacks parameters"):
        other.load_state_dict({"weight": state["weight"]})
    with pytest.raises(ValueError, match="decay"):
        EMA(net, 1.0)


def test_aliased_modules_get_the_ema_under_every_name():
    net = nn.Module()
    net.layers = nn.Linear(2, 2)
    net.alias = net.layers  # JMP's seq_energy_pre is such an alias
    ema = EMA(net, 0.5)
    with torch.no_grad():
        net.layers.weight.add_(1.0)
    ema.update()
    state = ema.state_dict()
    assert set(state) == {"layers.weight", "layers.bias", "alias.weight", "alias.bias"}
    assert torch.equal(state["layers.weight"], state["alias.weight"])
