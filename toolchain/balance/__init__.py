"""Rotation-scaling channel balancing: Hadamard matrices, statistics, folding, online transforms."""
