"""The topology module: every module path it names exists in built models, and the packages that
used to spell those paths themselves now get the same answers from it."""

from __future__ import annotations

import re

import pytest
from torch import nn

from toolchain.models import build_model, preset
from toolchain.topology import STAGE_NAMES, TOPOLOGIES, topology, topology_of


@pytest.fixture(scope="module")
def tiny():
    return build_model(preset("tiny"), seed=0)


def test_every_named_path_exists_in_a_built_model(tiny):
    topo = topology_of(tiny)
    assert topo.kind == "osdface"
    modules = dict(tiny.named_modules())
    layers = [n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for pattern in topo.first_last:  # each first/last rule names exactly one layer
        assert len([n for n in layers if re.search(pattern, n)]) == 1, pattern
    for consumer, producer in topo.producer_pairs:
        assert consumer in modules and producer in modules
        assert modules[producer].out_channels == modules[consumer].in_channels
    for prefix, children in topo.forward_order:
        assert prefix in modules and all(f"{prefix}.{c}" in modules for c in children), prefix
    for prefixes in topo.stages.values():
        assert all(p in modules for p in prefixes)
    unet = getattr(tiny, topo.time_root)
    time_mods = [n for n, _ in unet.named_modules() if topo.is_time_module(n)]
    assert "time_embedding" in time_mods and any(n.endswith("time_emb_proj") for n in time_mods)
    assert set(STAGE_NAMES) == set(topo.stages)


def test_default_scope_is_unet_and_vae_without_time_path(tiny):
    from toolchain.quant.config import QuantConfig

    cfg = QuantConfig()
    scoped = {n for n, m in tiny.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and cfg.in_scope(n)}
    want = {n for n, m in tiny.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
            and n.split(".")[0] in ("unet", "vae") and "time_emb" not in n}
    assert scoped == want


def test_units_stages_and_fold_pairs_come_from_the_topology(tiny):
    import copy

    from toolchain.balance.transform import fold_producers
    from toolchain.quant.calibrate import prepare_model
    from toolchain.quant.config import QuantConfig
    from toolchain.quant.units import reconstruction_units

    pairs = fold_producers(tiny)
    assert pairs["vae.quant_conv"][0] == "vae.encoder.conv_out" and pairs["vae.decoder.conv_in"][0] == "vae.post_quant_conv"
    assert pairs["embedder.quant_conv"][0] == "embedder.encoder.conv_out"
    assert any(k.endswith("to_out.0") and v[0].endswith("to_v") for k, v in pairs.items())
    model = copy.deepcopy(tiny)
    names = prepare_model(model, QuantConfig(method="minmax"))
    units = reconstruction_units(model)
    covered = [n for u in units for n in u.layers]
    assert sorted(covered) == sorted(names) and len(covered) == len(set(covered))  # each layer in exactly one unit
    stage = {u.name: u.stage for u in units}
    assert stage["unet.conv_in"] == "unet" and stage["vae.encoder.conv_in"] == "vae_encoder"
    assert stage["vae.decoder.conv_out"] == "vae_decoder"
    order = [u.name for u in units]
    assert order.index("vae.encoder.conv_in") < order.index("unet.conv_in") < order.index("unet.mid_block") \
        < order.index("unet.up_blocks.0") < order.index("vae.decoder.conv_in")


def test_unknown_kind_is_a_config_error():
    from toolchain.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown model kind"):
        topology("nope")
    assert "osdface" in TOPOLOGIES
