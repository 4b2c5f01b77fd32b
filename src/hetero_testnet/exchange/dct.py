"""Chunked orthonormal DCT-II for `--sync demo`: block plans, the transform and a bit-stable inverse.

DeMo (Peng et al., arXiv:2411.19870; bloc97/DeMo `demo.py`, Psyche `distro.rs`) splits every parameter
into blocks and takes the 2-D DCT-II of each: momentum is smooth inside a block, so a few
coefficients carry most of its energy and top-k of them is a good summary. Conventions here:

- Block shape (`plan_blocks`): h, w = the largest divisor of each dimension <= `chunk` (DeMo's
  `_get_smaller_split`), so blocks tile the parameter exactly. A 1-D parameter (n,) is treated as
  (1, n): h = 1, w = the largest divisor of n <= chunk. 50257 = 29 * 1733, so the embedding and the
  head get 29 x 64 blocks.
- Block order: a (R, C) parameter is a (gy, gx) grid of (h, w) blocks, gy = R/h, gx = C/w; block
  b = y * gx + x covers rows [y h, y h + h) and columns [x w, x w + w). Coefficient j of a block is
  frequency (j // w, j % w), row-major.
- Basis: D[k, i] = sqrt((1 if k == 0 else 2) / n) * cos(pi (2i + 1) k / (2n)) (orthonormal DCT-II),
  computed with Python's scalar `math.cos` in float64. torch.cos runs a vectorized kernel plus a
  scalar tail, which may differ in the last bit, and which elements fall in the tail depends on how
  the work is split over threads. Forward C = D_h X D_w^T; inverse X = D_h^T C D_w (D^-1 = D^T).

Two inverses, because only one of them must agree across processes:
- `idct_blocks`: float64 matmul. Fast; the encoder uses it for error feedback, a value that stays
  on its own client, so its last bits do not matter.
- `idct_blocks_exact`: the decoder's inverse, which every replica must reproduce bit for bit. A
  matmul's summation order depends on BLAS blocking, thread count and device, so its result does
  too. Here every matmul operand is first put on an integer grid, `q * 2**e` with one power-of-two
  scale per block and |q| <= 2**b, and the basis on `round(D * 2**24)`. Then every product is an
  integer below 2**(b + 24) and every partial sum, in any order, an integer of at most
  K * 2**(b + 24) <= 2**53 (K = the contraction length, b chosen from it), so float64 holds it
  exactly: the matmul's result is the exact sum whatever order, blocking, FMA or thread split the
  BLAS used. The only rounded steps are elementwise (the rounding onto the grid, power-of-two scaling,
  the final cast), which are correctly rounded IEEE operations computed per element and so
  independent of threads. Cost: precision of about 2**-23 of each block's peak, i.e. float32's.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

BASIS_BITS = 24
"""The exact inverse's basis grid: D is rounded to multiples of 2**-24 (|D| <= 1, so |q_D| <= 2**24)."""
_MANTISSA_BITS = 53  # float64 holds every integer of magnitude <= 2**53 exactly
_EXPONENT_FLOOR = -900  # per-block scales below 2**-900 are raised to it: tinier values flush to 0
_EXPONENT_CEIL = 900


def largest_divisor(n: int, limit: int) -> int:
    """The largest divisor of `n` that is <= `limit` (1 at least): DeMo's block side for a dimension n."""
    if n < 1 or limit < 1:
        raise ValueError(f"largest_divisor needs n >= 1 and limit >= 1 (got {n}, {limit})")
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1  # unreachable: 1 divides n


@dataclass(frozen=True)
class BlockPlan:
    """How one parameter is cut into DCT blocks (see the module docstring for the order)."""

    shape: tuple[int, ...]
    """The parameter's own shape, 1-D or 2-D."""
    h: int
    """Block rows (1 for a 1-D parameter)."""
    w: int
    """Block columns."""

    @property
    def rows(self) -> int:
        return 1 if len(self.shape) == 1 else self.shape[0]

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def grid(self) -> tuple[int, int]:
        """(gy, gx): blocks down and across."""
        return self.rows // self.h, self.cols // self.w

    @property
    def num_blocks(self) -> int:
        gy, gx = self.grid
        return gy * gx

    @property
    def block_numel(self) -> int:
        return self.h * self.w


def plan_blocks(shape: tuple[int, ...], chunk: int) -> BlockPlan:
    """The block plan of a parameter of `shape`; `ValueError` for a shape that is not 1-D or 2-D."""
    if len(shape) not in (1, 2) or any(d < 1 for d in shape):
        raise ValueError(f"DeMo's DCT handles 1-D and 2-D parameters only (got shape {tuple(shape)})")
    h = 1 if len(shape) == 1 else largest_divisor(shape[0], chunk)
    return BlockPlan(tuple(shape), h, largest_divisor(shape[-1], chunk))


@functools.cache
def _basis(n: int) -> torch.Tensor:
    rows = []
    for k in range(n):
        scale = math.sqrt((1.0 if k == 0 else 2.0) / n)
        rows.append([scale * math.cos(math.pi * (2 * i + 1) * k / (2 * n)) for i in range(n)])
    return torch.tensor(rows, dtype=torch.float64)


def dct_basis(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix D (n, n), float64, D[k, i] as in the module docstring (a copy)."""
    return _basis(n).clone()


@functools.cache
def _grid_basis(n: int) -> torch.Tensor:
    """D rounded onto the grid 2**-BASIS_BITS, stored as the integers round(D * 2**BASIS_BITS)."""
    return torch.round(_basis(n) * float(1 << BASIS_BITS))


def to_blocks(x: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """(R, C) or (n,) -> (num_blocks, h, w), blocks in row-major grid order (a copy)."""
    gy, gx = plan.grid
    return x.reshape(gy, plan.h, gx, plan.w).permute(0, 2, 1, 3).reshape(plan.num_blocks, plan.h, plan.w)


def from_blocks(blocks: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """(num_blocks, h, w) -> the parameter's shape; the inverse of `to_blocks`."""
    gy, gx = plan.grid
    return blocks.reshape(gy, gx, plan.h, plan.w).permute(0, 2, 1, 3).reshape(plan.shape)


def dct_blocks(x: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """DCT-II of every block of `x` (the parameter's shape), in float64: (num_blocks, h, w)."""
    blocks = to_blocks(x.to(torch.float64), plan)  # (nb, h, w)
    return _basis(plan.h) @ blocks @ _basis(plan.w).T  # C = D_h X D_w^T


def idct_blocks(coef: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """Inverse of `dct_blocks` by float64 matmul, in the parameter's shape. Not bit-stable across
    thread counts or devices: for values that stay on one process (error feedback)."""
    coef = coef.to(torch.float64).reshape(plan.num_blocks, plan.h, plan.w)
    return from_blocks(_basis(plan.h).T @ coef @ _basis(plan.w), plan)  # X = D_h^T C D_w


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """2.0 ** exponent (int64, within [-1022, 1023]) as float64, built from its bits: exact by construction."""
    return ((exponent + 1023) << 52).view(torch.float64)


def _grid_bits(k: int) -> int:
    """Bits b for the coefficients of a matmul contracting over k terms: k * 2**(b + BASIS_BITS) <= 2**53."""
    return _MANTISSA_BITS - BASIS_BITS - max(0, (k - 1).bit_length())


def _to_grid(t: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """t (nb, a, c) ~= q * 2**(e - bits) per block, q integer-valued with |q| <= 2**bits; returns (q, e).

    The peak (an exact max) sets e with peak < 2**e; multiplying by a power of two is exact and
    `round` (half to even) is one correctly rounded operation per element.
    """
    peak = t.abs().amax(dim=(1, 2))  # (nb,)
    _, e = torch.frexp(peak)  # peak = m * 2**e, 0.5 <= m < 1; e = 0 for a zero block
    e = e.to(torch.int64).clamp(_EXPONENT_FLOOR, _EXPONENT_CEIL)
    q = torch.round(t * _pow2(bits - e).view(-1, 1, 1))
    return q, e


def idct_blocks_exact(coef: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """Inverse DCT whose float64 result depends only on `coef`, not on threads, BLAS or batching.

    `coef` is (num_blocks, h, w) or (num_blocks, h*w). Returns float64 in the parameter's shape.
    A block with any non-finite coefficient comes out all NaN (set explicitly, so no inf arithmetic
    order is involved). See the module docstring for why the matmuls are exact.
    """
    coef = coef.to(torch.float64).reshape(plan.num_blocks, plan.h, plan.w)
    bad = ~torch.isfinite(coef).all(dim=2).all(dim=1)  # (nb,)
    coef = torch.where(bad.view(-1, 1, 1), 0.0, coef)
    # Pass 1, over block columns: Y[b, r, l] = sum_s C[b, r, s] D_w[s, l]
    bits_w = _grid_bits(plan.w)
    q, e = _to_grid(coef, bits_w)
    y = (q @ _grid_basis(plan.w)) * _pow2(e - bits_w - BASIS_BITS).view(-1, 1, 1)  # exact integers, rescaled
    # Pass 2, over block rows: X[b, i, l] = sum_r D_h[r, i] Y[b, r, l]
    bits_h = _grid_bits(plan.h)
    q, e = _to_grid(y, bits_h)
    x = (_grid_basis(plan.h).T @ q) * _pow2(e - bits_h - BASIS_BITS).view(-1, 1, 1)
    x = torch.where(bad.view(-1, 1, 1), math.nan, x)
    return from_blocks(x, plan)
