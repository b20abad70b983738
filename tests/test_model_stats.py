"""`toolchain model stats`: per-layer kurtosis and input-channel statistics against plain numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from toolchain.cli import main
from toolchain.eval import model_stats as MS


def _pearson_kurtosis(a: np.ndarray) -> float:
    """E[(x − μ)⁴] / (E[(x − μ)²])², population moments, written out."""
    d = a.astype(np.float64).ravel() - a.mean()
    return float((d**4).mean() / (d**2).mean() ** 2)


class _Planted(nn.Module):
    """A conv and a linear reading the same 16-channel input (axis 1 for the conv, last for the linear),
    and a second linear reading the first one's output."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(16, 64, 3, padding=1)
        self.lin = nn.Linear(16, 1024)
        self.head = nn.Linear(1024, 8)
        with torch.no_grad():
            u = torch.rand(self.conv.weight.shape, generator=g, dtype=torch.float64) - 0.5  # Laplace by inverse CDF: Pearson 6
            self.conv.weight.copy_((-torch.sign(u) * torch.log1p(-2 * u.abs()) * 0.05).float())
            self.lin.weight.copy_(torch.randn(self.lin.weight.shape, generator=g) * 0.02)  # Gaussian: Pearson 3

    def forward(self, x):
        self.conv(x)
        return self.head(self.lin(x.permute(0, 2, 3, 1)))


def _batches():
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(3):
        x = torch.randn(2, 16, 8, 8, generator=g)
        x[:, 5] *= 40.0  # planted outlier channel: |max| ≈ 40× the median channel's
        x[:, 9] *= 5.0  # large but below the 10× rule
        x[:, 11] += 3.0  # shifted: range unchanged, |max| ≈ 2×
        out.append(x)
    return out


def test_layer_statistics_match_numpy_on_planted_outliers_and_known_kurtosis():
    model = _Planted().eval()
    batches = _batches()
    recs = {r["name"]: r for r in MS.layer_statistics(model, {"conv": model.conv, "lin": model.lin, "head": model.head}, batches)}

    # kurtosis: the Pearson convention, equal to the moments written out; Gaussian ≈ 3, Laplace ≈ 6
    for name, expected, tol in (("lin", 3.0, 0.15), ("conv", 6.0, 1.0)):
        w = getattr(model, name).weight.detach().double().numpy()
        assert recs[name]["weight_kurtosis"] == pytest.approx(_pearson_kurtosis(w), rel=1e-9)
        assert recs[name]["weight_kurtosis"] == pytest.approx(expected, abs=tol)

    # input channels, recomputed from the raw inputs with numpy (channels first for the conv, last for the linears)
    x = torch.cat(batches).numpy().astype(np.float64)
    per_ch = x.transpose(1, 0, 2, 3).reshape(16, -1)
    lin_out = x.transpose(0, 2, 3, 1).reshape(-1, 16) @ model.lin.weight.detach().double().numpy().T + model.lin.bias.detach().double().numpy()
    for name, chans in (("conv", per_ch), ("lin", per_ch), ("head", lin_out.T)):
        lo, hi = chans.min(1), chans.max(1)
        rng, absmax = hi - lo, np.maximum(np.abs(lo), np.abs(hi))
        got = recs[name]["input"]
        assert got["channels"] == chans.shape[0]
        assert got["channel_range_ratio"] == pytest.approx(rng.max() / np.median(rng), rel=1e-5)
        assert got["max_to_median_absmax"] == pytest.approx(absmax.max() / np.median(absmax), rel=1e-5)
        assert got["outlier_count"] == int((absmax > 10 * np.median(absmax)).sum())
    assert recs["conv"]["input"]["outlier_channels"] == [5] and recs["lin"]["input"]["outlier_channels"] == [5]
    assert recs["conv"]["input"]["channel_range_ratio"] > 25  # the planted channel dominates
    assert not recs["head"]["input"]["has_outlier_channels"]  # a dense layer spreads channel 5 over every output

    s = MS.summarize(list(recs.values()))
    assert s["median_weight_kurtosis"] == pytest.approx(float(np.median([r["weight_kurtosis"] for r in recs.values()])))
    assert s["fraction_layers_with_outlier_channel_inputs"] == pytest.approx(2 / 3)
    assert s["top_range_ratio"][0]["name"] in ("conv", "lin")


def test_channel_summary_reports_undefined_ratios_instead_of_dividing_by_zero():
    lo = np.zeros(6)
    hi = np.array([0.0, 0.0, 0.0, 0.0, 1.0, 2.0])  # the median channel never moves
    got = MS.channel_summary(lo, hi)
    assert got["channel_range_ratio"] is None and got["max_to_median_absmax"] is None and "never moves" in got["note"]
    assert got["outlier_channels"] == [5, 4]  # every moving channel stands out


def test_model_stats_command_writes_report_and_explains_bad_input(tiny_model_path, calib_dir, tmp_path, capsys):
    from toolchain.models import load_model
    from toolchain.quant.config import quantizable_layers

    out = tmp_path / "stats"
    assert main(["model", "stats", "--model", str(tiny_model_path), "--calib", str(calib_dir), "--images", "4", "--out", str(out)]) == 0
    doc = json.loads((out / "model_stats.json").read_text())
    names = [n for n, _ in quantizable_layers(load_model(tiny_model_path))]
    assert [r["name"] for r in doc["layers"]] == names and doc["images"] == 4
    kurt = [r["weight_kurtosis"] for r in doc["layers"] if r["weight_kurtosis"] is not None]
    assert doc["summary"]["median_weight_kurtosis"] == pytest.approx(float(np.median(kurt)))
    seen = [r for r in doc["layers"] if r["input"] is not None]
    assert doc["summary"]["fraction_layers_with_outlier_channel_inputs"] == pytest.approx(
        np.mean([r["input"]["has_outlier_channels"] for r in seen]))
    assert (out / "model_stats.png").stat().st_size > 10_000 and "| layer |" in (out / "model_stats.md").read_text()

    capsys.readouterr()
    missing = tmp_path / "no_such_model.safetensors"
    assert main(["model", "stats", "--model", str(missing), "--calib", str(calib_dir), "--out", str(tmp_path / "s2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "no_such_model" in err[0]
    assert main(["model", "stats", "--model", str(tiny_model_path), "--calib", str(tmp_path), "--out", str(tmp_path / "s3")]) == 2
    assert "not a calibration set" in capsys.readouterr().err
