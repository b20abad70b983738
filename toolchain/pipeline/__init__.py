"""Inference pipelines around the one-step model."""
