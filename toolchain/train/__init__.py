"""Shared training infrastructure (reference model, QD-LoRA, learned baselines)."""
