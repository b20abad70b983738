"""The fake-quant core: ranges, round-trip error bounds, STE, observers."""

import pytest
import torch

from toolchain.errors import ConfigError
from toolchain.quant.observers import MinMaxObserver, MSEObserver, PercentileObserver
from toolchain.quant.quantizer import FakeQuantizer, QuantSpec, fake_quantize, qparams_from_range


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_round_trip_error_is_bounded_by_half_a_step(bits, symmetric):
    x = torch.linspace(-3.0, 5.0, 10001)
    spec = QuantSpec(bits, symmetric=symmetric)
    scale, zero = qparams_from_range(x.min(), x.max(), spec)
    xq = fake_quantize(x, scale, zero, spec.qmin, spec.qmax)
    err = (xq - x).abs()
    assert err.max() <= scale / 2 + 1e-6
    # uniform rounding noise: MSE ≈ step²/12
    assert err.pow(2).mean() == pytest.approx(float(scale) ** 2 / 12, rel=0.15)
    levels = torch.unique(torch.round(xq / scale))
    assert len(levels) <= 2**bits


def test_grid_ranges():
    assert (QuantSpec(4, symmetric=True).qmin, QuantSpec(4, symmetric=True).qmax) == (-7, 7)
    assert (QuantSpec(4).qmin, QuantSpec(4).qmax) == (0, 15)
    assert (QuantSpec(8, symmetric=True).qmin, QuantSpec(8, symmetric=True).qmax) == (-127, 127)


def test_asymmetric_zero_is_exact():
    spec = QuantSpec(4)
    scale, zero = qparams_from_range(torch.tensor(-0.37), torch.tensor(2.9), spec)
    assert fake_quantize(torch.tensor(0.0), scale, zero, spec.qmin, spec.qmax) == 0.0
    assert float(zero) == round(float(zero))


def test_clipping_outside_range():
    spec = QuantSpec(4, symmetric=True)
    scale, zero = qparams_from_range(torch.tensor(-1.0), torch.tensor(1.0), spec)
    assert float(fake_quantize(torch.tensor(10.0), scale, zero, spec.qmin, spec.qmax)) == pytest.approx(1.0)


def test_straight_through_gradient():
    x = torch.linspace(-0.9, 0.9, 11, requires_grad=True)
    spec = QuantSpec(4, symmetric=True)
    scale, zero = qparams_from_range(torch.tensor(-1.0), torch.tensor(1.0), spec)
    fake_quantize(x, scale, zero, spec.qmin, spec.qmax).sum().backward()
    assert torch.allclose(x.grad, torch.ones_like(x))


def test_learnable_scale_receives_gradient():
    q = FakeQuantizer(QuantSpec(4))
    q.calibrate_weight(torch.randn(1000))
    q.make_learnable()
    x = torch.randn(100)
    (q(x) - x).pow(2).sum().backward()
    assert isinstance(q.scale, torch.nn.Parameter) and q.scale.grad is not None and q.scale.grad.abs().sum() > 0


def test_per_channel_weight_quantizer():
    w = torch.randn(8, 4, 3, 3) * torch.logspace(-2, 1, 8).view(8, 1, 1, 1)
    q = FakeQuantizer(QuantSpec(4, symmetric=True, per_channel=True), channels=8)
    q.calibrate_weight(w)
    err = (q(w) - w).abs().flatten(1).max(1).values
    assert torch.all(err <= q.scale / 2 + 1e-6)
    assert torch.allclose(q.scale, w.abs().flatten(1).max(1).values / 7)


def test_observers_on_heavy_tailed_data():
    torch.manual_seed(0)
    x = torch.randn(200_000)
    x[:20] = 60.0  # rare outliers
    spec = QuantSpec(4)
    mm, pc, mse = MinMaxObserver(), PercentileObserver(99.9), MSEObserver()
    for chunk in x.split(50_000):
        for o in (mm, pc, mse):
            o.update(chunk)
    errs = {}
    for name, o in (("minmax", mm), ("percentile", pc), ("mse", mse)):
        s, z = o.compute_qparams(spec)
        errs[name] = float((fake_quantize(x, s, z, spec.qmin, spec.qmax) - x).pow(2).mean())
    assert errs["percentile"] < errs["minmax"] and errs["mse"] < errs["minmax"]


def test_observer_state_round_trips():
    o = MSEObserver()
    o.update(torch.randn(5000))
    o2 = MSEObserver()
    o2.load_state_dict(o.state_dict())
    spec = QuantSpec(4)
    assert all(torch.equal(a, b) for a, b in zip(o.compute_qparams(spec), o2.compute_qparams(spec)))


def test_invalid_specs_rejected():
    with pytest.raises(ConfigError):
        QuantSpec(1)
    with pytest.raises(ConfigError):
        QuantSpec(4, observer="kmeans")
