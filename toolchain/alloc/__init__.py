"""Adaptive activation bit-width allocation: sensitivity sweep, error table, integer program, table."""
