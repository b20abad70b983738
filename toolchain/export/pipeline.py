"""One-file pipelines: the whole LQ → restored pipeline and each of its stages in one exported file.

TFLite: one ``.tflite`` with named signatures — ``restore`` (the whole pipeline, first, so subgraph 0 is the
pipeline and ``Interpreter.run`` without a key runs it) and one per stage of the model's kind
(``vae_encoder``, ``embedder`` where the kind has one, ``unet``, ``vae_decoder``). Weights shared by two
signatures are one buffer in the file (the converter deduplicates them; the integer route writes the
checkpoint's integers once per buffer, see toolchain/export/litert/weights.py).

ONNX: one graph for the whole pipeline whose stage boundaries are named tensors and extra graph outputs
(``z_latent``, ``prompt``, ``x0_latent``), with the stage table in the model metadata
(``quantface_stages``); ``onnx_stage(path, stage)`` cuts a stage out as a standalone model
(``onnx.utils.Extractor``), which is what ORT Mobile or an NPU compiler runs per stage. ONNX has no
multi-entry-point graphs, so a stage that starts from an intermediate tensor (the UNet, the decoder) can
only be run on its own as an extracted graph.

Tensor names are the same in both targets (``STAGE_IO``): a stage's outputs are the next stage's inputs
by name, so chaining the stage signatures needs no renaming. All tensors are float32 NCHW: images
(N, 3, H, W) in [-1, 1], latents (N, C_latent, H/f, W/f), the prompt (N, T, D).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from toolchain.export.parts import _Part
from toolchain.errors import ExportError
from toolchain.topology import topology_of

RESTORE = "restore"  # the whole-pipeline signature (mirrored in android_demo/.../LiteRtRestorer.java)
STAGES_KEY = "quantface_stages"  # ONNX metadata: JSON {stage: {"inputs": [...], "outputs": [...], "part": ...}}

# signature / stage → (export part, input names, output name). The names are also the ONNX pipeline's tensor names.
STAGE_IO: dict[str, tuple[str, tuple[str, ...], str]] = {
    RESTORE: ("full", ("lq_image",), "restored_image"),
    "vae_encoder": ("vae_encoder", ("lq_image",), "z_latent"),
    "embedder": ("embedder", ("lq_image",), "prompt"),
    "unet": ("unet", ("z_latent", "prompt"), "x0_latent"),
    "vae_decoder": ("vae_decoder", ("x0_latent",), "restored_image"),
}


def signatures_of(model: nn.Module) -> dict[str, tuple[str, tuple[str, ...], str]]:
    """Signature name → (part, input names, output name) for ``model``'s kind, ``restore`` first, then the stages
    in pipeline order. A constant-prompt kind (osediff) has no ``embedder`` and its ``unet`` takes ``z_latent`` only."""
    parts = topology_of(model).export_parts
    constant_prompt = bool(topology_of(model).constant_prompt_modules)
    out = {}
    for name, (part, ins, o) in STAGE_IO.items():
        if part not in parts:
            continue
        if name == "unet" and constant_prompt:
            ins = ("z_latent",)
        out[name] = (part, ins, o)
    return out


class NamedSignature(nn.Module):
    """``part`` of ``model`` with named inputs (keyword arguments, in ``inputs`` order) and a one-entry dict
    output ``{output: tensor}``: litert-torch names the signature's tensors after them."""

    def __init__(self, model: nn.Module, part: str, inputs: tuple[str, ...], output: str):
        super().__init__()
        self.inner = _Part(model, part).eval()
        self.input_names = inputs
        self.output_name = output

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.output_name: self.inner(*[inputs[n] for n in self.input_names])}


def stage_example_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """Example tensors for every pipeline tensor name, from one forward of ``model`` on its part_module example
    image (shapes: lq_image (1, 3, S, S), z_latent / x0_latent (1, C, S/f, S/f), prompt (1, T, D))."""
    from toolchain.export.parts import part_module

    _, (image,), _, _ = part_module(model, "full")
    with torch.no_grad():
        z = model.encode(image)
        prompt = model.prompt(image)
        x0 = model.denoise(z, prompt)
    return {"lq_image": image, "z_latent": z, "prompt": prompt, "x0_latent": x0}


def convert_signatures(module: nn.Module) -> bytes:
    """The float multi-signature TFLite of an export-ready ``module`` (toolchain/export/prepare.py), via litert-torch's
    ``Converter().signature(name, module, sample_kwargs=...)`` — one subgraph per signature, ``restore`` first."""
    import tempfile
    from pathlib import Path

    import litert_torch

    examples = stage_example_inputs(module)
    conv = litert_torch.Converter()
    for name, (part, ins, out) in signatures_of(module).items():
        conv.signature(name, NamedSignature(module, part, ins, out).eval(), sample_kwargs={n: examples[n] for n in ins})
    with tempfile.TemporaryDirectory() as tmp:
        conv.convert().export(str(Path(tmp) / "pipeline.tflite"))
        return (Path(tmp) / "pipeline.tflite").read_bytes()


def signature_inputs(model: nn.Module, images: list[torch.Tensor]) -> dict[str, list[tuple[torch.Tensor, ...]]]:
    """Signature → the input tuples (in the signature's input order) it sees when the pipeline restores ``images``
    (LQ batches in [-1, 1]): the per-signature counterpart of export.parts.part_inputs."""
    from toolchain.export.parts import part_inputs

    return {name: part_inputs(model, part, images) for name, (part, _, _) in signatures_of(model).items()}


# ---------------------------------------------------------------- ONNX


class OnnxPipeline(nn.Module):
    """The whole pipeline returning (restored_image, z_latent, [prompt,] x0_latent): the stage tensors become named
    graph outputs of the one ONNX graph (``onnx_output_names``), so their producers are visible and a stage can be
    cut out between them (``onnx_stage``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.constant_prompt = bool(topology_of(model).constant_prompt_modules)

    def forward(self, lq_image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        z = m.encode(lq_image)
        prompt = m.prompt(lq_image)
        x0 = m.denoise(z, prompt)
        restored = m.decode(x0).clamp(-1.0, 1.0)
        return (restored, z, x0) if self.constant_prompt else (restored, z, prompt, x0)


def onnx_output_names(model: nn.Module) -> list[str]:
    return ["restored_image", "z_latent", "x0_latent"] if topology_of(model).constant_prompt_modules else \
        ["restored_image", "z_latent", "prompt", "x0_latent"]


def onnx_stage_table(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Stage → {"part", "inputs", "outputs", "shapes": {tensor: shape}} of the ONNX pipeline graph (written to its
    metadata; the shapes are the fixed export shapes, which shape inference loses on intermediate tensors)."""
    examples = stage_example_inputs(model)
    return {name: {"part": part, "inputs": list(ins), "outputs": [out], "shapes": {n: list(examples[n].shape) for n in ins}}
            for name, (part, ins, out) in signatures_of(model).items()}


def onnx_stages(proto_or_session) -> dict[str, dict[str, Any]] | None:
    """The stage table of an ONNX pipeline (a ModelProto or an ORT session), None for a single-part export."""
    if hasattr(proto_or_session, "get_modelmeta"):
        raw = proto_or_session.get_modelmeta().custom_metadata_map.get(STAGES_KEY)
    else:
        raw = next((p.value for p in proto_or_session.metadata_props if p.key == STAGES_KEY), None)
    return json.loads(raw) if raw else None


def onnx_stage(model_or_path, stage: str):
    """The standalone ONNX model of ``stage`` cut out of a pipeline export (a path or ModelProto): the nodes between
    the stage's input and output tensors, their initializers and the local functions. ``restore`` returns the whole
    graph with only ``restored_image`` as output. Raises ExportError for a file without stages or an unknown stage."""
    import onnx
    from onnx.utils import Extractor

    proto = onnx.load(str(model_or_path)) if not isinstance(model_or_path, onnx.ModelProto) else model_or_path
    stages = onnx_stages(proto)
    if not stages:
        raise ExportError("this ONNX file has no pipeline stages (it was exported with --part other than full, or before "
                          "one-file pipelines); export --part full")
    if stage not in stages:
        raise ExportError(f"unknown stage '{stage}' (this pipeline has {', '.join(stages)})")
    spec = stages[stage]
    sub = Extractor(proto).extract_model(spec["inputs"], spec["outputs"])
    for value in sub.graph.input:  # the stage's fixed input shape (intermediate tensors come out of shape inference symbolic)
        shape = spec.get("shapes", {}).get(value.name)
        if shape:
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for d in shape:
                dims.add().dim_value = int(d)
    sub.functions.extend(f for f in proto.functions if f.name not in {g.name for g in sub.functions})
    del sub.opset_import[:]
    sub.opset_import.extend(proto.opset_import)
    sub.ir_version = proto.ir_version
    onnx.helper.set_model_props(sub, {p.key: p.value for p in proto.metadata_props if p.key != STAGES_KEY})
    return sub
