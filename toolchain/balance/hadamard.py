"""Hadamard matrices of the orders diffusion UNets and VAEs need, and a fast transform.

An n×n Hadamard matrix has ±1 entries and H·Hᵀ = n·I; it exists only for n = 1, 2 and multiples
of 4. Constructions used here:

* Sylvester: H_{2n} = [[H, H], [H, −H]] for powers of two;
* Paley I (q prime, q ≡ 3 mod 4): order q + 1 (12, 20, 24, 44, 48, 60, 68, 72, 80, ...);
* Paley II (q prime, q ≡ 1 mod 4): order 2(q + 1) (12, 28, 36, 60, 76, 108, ...);
* Kronecker products of those (e.g. 240 = 12 ⊗ 20, so 960 = 240 ⊗ 4 or 60 ⊗ 16).

Every order is factored as n = m · 2^k with the smallest available "dense" block m, and
H_n = H_m ⊗ H_{2^k}. The fast transform reshapes the channel axis to (m, 2^k), runs
Walsh-Hadamard butterflies over the 2^k axis (k·n additions) and a dense m×m product over the
other (m·n MACs), then divides by √n — orthonormal, so the inverse of ``x ↦ Hx`` is
``x ↦ Hᵀx`` (Paley blocks are not symmetric).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from toolchain.errors import ToolchainError

MAX_DENSE_BLOCK = 256


class HadamardUnavailable(ToolchainError):
    """No Hadamard matrix of this order can be constructed here (e.g. order 3)."""


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(math.isqrt(q)) + 1))


def sylvester(n: int) -> np.ndarray:
    if n < 1 or n & (n - 1):
        raise HadamardUnavailable(f"Sylvester construction needs a power of two, got {n}")
    h = np.ones((1, 1), dtype=np.int64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = χ(j − i) with χ the quadratic character of GF(q), q prime."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if a in residues else -1 for a in range(1, q)], dtype=np.int64)
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[idx]


def paley1(q: int) -> np.ndarray:
    """Paley construction I: order q + 1 for prime q ≡ 3 (mod 4)."""
    if not (_is_prime(q) and q % 4 == 3):
        raise HadamardUnavailable(f"Paley I needs a prime q ≡ 3 mod 4, got {q}")
    n = q + 1
    s = np.zeros((n, n), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return s + np.eye(n, dtype=np.int64)


def paley2(q: int) -> np.ndarray:
    """Paley construction II: order 2(q + 1) for prime q ≡ 1 (mod 4)."""
    if not (_is_prime(q) and q % 4 == 1):
        raise HadamardUnavailable(f"Paley II needs a prime q ≡ 1 mod 4, got {q}")
    n = q + 1
    c = np.zeros((n, n), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    a = np.array([[1, -1], [-1, -1]], dtype=np.int64)
    b = np.array([[1, 1], [1, -1]], dtype=np.int64)
    out = np.zeros((2 * n, 2 * n), dtype=np.int64)
    for i in range(n):
        for j in range(n):
            out[2 * i : 2 * i + 2, 2 * j : 2 * j + 2] = b if c[i, j] == 0 else c[i, j] * a
    return out


@lru_cache(maxsize=None)
def _paley_orders() -> dict[int, tuple[str, int]]:
    """Non-power-of-two block orders (≤ MAX_DENSE_BLOCK) with a Paley construction."""
    orders: dict[int, tuple[str, int]] = {}
    for q in range(3, MAX_DENSE_BLOCK):
        if _is_prime(q) and q % 4 == 3 and q + 1 <= MAX_DENSE_BLOCK:
            orders.setdefault(q + 1, ("paley1", q))
        if _is_prime(q) and q % 4 == 1 and 2 * (q + 1) <= MAX_DENSE_BLOCK:
            orders.setdefault(2 * (q + 1), ("paley2", q))
    return {m: v for m, v in orders.items() if m & (m - 1)}


@lru_cache(maxsize=None)
def _block(m: int) -> np.ndarray:
    """A dense block: a Paley matrix, or a Kronecker product of two Paley matrices."""
    direct = _paley_orders().get(m)
    if direct is not None:
        kind, q = direct
        return paley1(q) if kind == "paley1" else paley2(q)
    for a in sorted(_paley_orders()):
        if m % a == 0 and (m // a) in _paley_orders():
            return np.kron(_block(a), _block(m // a))
    raise HadamardUnavailable(f"no construction for block order {m}")


@lru_cache(maxsize=None)
def factorize(n: int) -> tuple[int, int]:
    """n = m · 2^k with the smallest constructible dense block m; returns (m, 2^k)."""
    if n >= 1 and n & (n - 1) == 0:
        return 1, n
    if n < 4 or n % 4:
        raise HadamardUnavailable(f"no Hadamard matrix of order {n} exists (orders are 1, 2 or multiples of 4)")
    pow2 = n & -n
    candidates = []
    p = pow2
    while p >= 1:
        m = n // p
        if m <= MAX_DENSE_BLOCK * MAX_DENSE_BLOCK:
            try:
                _block(m)
                candidates.append((m, p))
            except HadamardUnavailable:
                pass
        p //= 2
    if not candidates:
        raise HadamardUnavailable(f"no Hadamard construction known here for order {n}")
    return min(candidates)


def is_available(n: int) -> bool:
    try:
        factorize(n)
        return True
    except HadamardUnavailable:
        return False


@lru_cache(maxsize=64)
def hadamard_matrix(n: int) -> np.ndarray:
    """The ±1 matrix H_n = H_m ⊗ H_{2^k} (int64)."""
    m, p = factorize(n)
    return np.kron(_block(m) if m > 1 else np.ones((1, 1), dtype=np.int64), sylvester(p))


@lru_cache(maxsize=64)
def _cached_block_tensor(m: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.tensor(_block(m), dtype=dtype, device=device)


def _block_tensor(m: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    if torch.jit.is_tracing():  # a tensor cached in one trace must not leak into another
        return torch.tensor(_block(m), dtype=dtype, device=device)
    return _cached_block_tensor(m, dtype, device)


def _butterfly(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform over the last axis (length a power of two)."""
    n = x.shape[-1]
    h = 1
    lead = x.shape[:-1]
    while h < n:
        x = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = x[..., 0, :], x[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return x.reshape(*lead, n)


def hadamard_transform(x: torch.Tensor, dim: int = -1, transpose: bool = False, normalize: bool = True) -> torch.Tensor:
    """y = H·x (or Hᵀ·x) along ``dim`` with the fast factored algorithm; orthonormal by default."""
    n = int(x.shape[dim])  # a traced size under torch.onnx tracing; the factorisation needs a plain int
    m, p = factorize(n)
    x = x.movedim(dim, -1)
    lead = x.shape[:-1]
    y = x.reshape(*lead, m, p)
    if p > 1:
        y = _butterfly(y)
    if m > 1:
        block = _block_tensor(m, y.dtype, str(y.device))
        y = torch.matmul(block.t() if transpose else block, y)
    y = y.reshape(*lead, n)
    if normalize:
        y = y / math.sqrt(n)
    return y.movedim(-1, dim)


def transform_ops(n: int) -> dict[str, int]:
    """Operation count of one fast transform of length n: adds (butterflies) and MACs (dense block)."""
    m, p = factorize(n)
    return {"adds": int(math.log2(p)) * n if p > 1 else 0, "macs": m * n if m > 1 else 0, "scale_muls": n}
