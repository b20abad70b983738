"""Params/ops accounting against hand-computed counts."""

import pytest
import torch
from torch import nn

from toolchain.eval.accounting import count
from toolchain.quant.calibrate import prepare_model
from toolchain.quant.config import QuantConfig


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)  # 8x8 out
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2)  # 4x4 out
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(self.conv2(self.conv1(x)).flatten(1))


def test_counts_match_hand_computation():
    acc = count(SmallNet(), torch.zeros(1, 3, 8, 8))
    by_name = {l.name: l for l in acc.layers}
    assert by_name["conv1"].params == 8 * 3 * 9 + 8
    assert by_name["conv1"].macs == 8 * 8 * 8 * (3 * 9)
    assert by_name["conv2"].params == 16 * 4 * 9 + 16
    assert by_name["conv2"].macs == 16 * 4 * 4 * (4 * 9)
    assert by_name["fc"].params == 256 * 10 + 10
    assert by_name["fc"].macs == 10 * 256
    total_macs = 8 * 8 * 8 * 27 + 16 * 16 * 36 + 2560
    assert acc.honest()["macs_G"] * 1e9 == pytest.approx(total_macs)
    assert acc.honest()["bops_G"] * 1e9 == pytest.approx(total_macs * 32 * 32)


def test_bit_widths_change_both_conventions():
    net = SmallNet()
    prepare_model(net, QuantConfig.for_bits("minmax", "w4a8", include=[".*"]))
    acc = count(net, torch.zeros(1, 3, 8, 8))
    params = sum(l.params for l in acc.layers)
    macs = sum(l.macs for l in acc.layers)
    assert acc.paper_convention()["params_M"] * 1e6 == pytest.approx(params * 4 / 32)
    assert acc.paper_convention()["ops_G"] * 1e9 == pytest.approx(2 * macs * (4 + 8) / 64)
    assert acc.honest()["bops_G"] * 1e9 == pytest.approx(macs * 4 * 8)
    assert acc.honest()["size_MB"] * 1e6 == pytest.approx(params * 4 / 8)


def test_attention_products_are_counted(tiny_model):
    acc = count(tiny_model, torch.zeros(1, 3, 32, 32))
    attn = [l for l in acc.layers if l.kind == "attention"]
    assert attn, "the UNet has attention blocks"
    # self-attention of the first transformer at 16x16 latent, inner dim 32: 2 * 256 * 256 * 32
    first = next(l for l in attn if l.name.startswith("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1"))
    assert first.macs == 2 * 256 * 256 * 32
