"""OSDFace-shaped models: configs, the one-step network, and storage."""

from toolchain.models.configs import PRESETS, EmbedderConfig, ModelConfig, preset
from toolchain.models.osdface import OSDFaceModel, build_model
from toolchain.models.storage import load_model, save_model

__all__ = ["PRESETS", "EmbedderConfig", "ModelConfig", "OSDFaceModel", "build_model", "load_model", "preset", "save_model"]
