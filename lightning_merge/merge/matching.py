"""Correlation -> permutation: Hungarian matching (``scipy.optimize.linear_sum_assignment``, maximised).

Every function takes a correlation matrix ``corr`` (d, d) with rows = A's features and columns = B's and returns a
LongTensor ``perm`` with ``perm[i]`` = the B feature that goes to position i (A keeps its order, B is permuted), the
orientation `lightning_merge.merge.alignment.Permutation` takes. The signed correlation is matched.

Attention variants (Verma & Elbayad 2024, §3.2): `match_head_perm`, `match_monotonic` and `match_ignore_heads`.
Residual variants pick which feature points feed the correlation: `RESIDUAL_POINTS`. Beyond permutations,
`head_procrustes` fits one orthogonal map per paired head (Schönemann's orthogonal Procrustes) from a cross moment.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from lightning_merge.errors import DataError


def match_features(corr: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """One Hungarian assignment over all features: ``perm[i]`` = B feature matched to A feature i.

    Args:
        corr: (d, d) correlation, rows = A's features.
        overwrite: ``corr`` may be destroyed (negated in place), for a matrix the caller no longer needs: with
            ``maximize=True`` scipy negates into a d x d copy of its own, 32 MiB for a 2048-wide FF layer.
    """
    _check_square(corr)
    values = _as_numpy(corr)
    if overwrite:
        rows, cols = linear_sum_assignment(np.negative(values, out=values))  # scipy's maximize negates the same way
    else:
        rows, cols = linear_sum_assignment(values, maximize=True)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm)


def match_head_perm(corr: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Head-Perm: for every (head of A, head of B) solve the within-head assignment and keep its total correlation;
    pair heads by a num_heads x num_heads assignment on those totals; compose the head pairing with the inner ones.
    Function-preserving (heads move whole).
    """
    blocks = _head_blocks(corr, num_heads)  # (H_a, H_b, hd, hd)
    inner = [[_assign(blocks[h_a, h_b]) for h_b in range(num_heads)] for h_a in range(num_heads)]
    scores = np.array([[total for _, total in row] for row in inner])
    head_of_a = match_features(torch.from_numpy(scores)).numpy()
    return _compose(num_heads, corr.shape[0] // num_heads, head_of_a, lambda h: inner[h][head_of_a[h]][0])


def match_monotonic(corr: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Monotonic: head j of A is paired with head j of B only; dims are assigned within each head.
    Function-preserving.
    """
    blocks = _head_blocks(corr, num_heads)
    head_of_a = np.arange(num_heads)
    return _compose(num_heads, corr.shape[0] // num_heads, head_of_a, lambda h: _assign(blocks[h, h])[0])


def match_ignore_heads(corr: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Ignore-Heads: one d x d assignment that may move features across heads.

    NOT function-preserving: a feature moved into another head joins that head's softmax(QKᵀ), so the permuted
    model computes a different function. It is a baseline of the paper, kept for comparison.
    """
    return match_features(corr)


def head_pairing(perm: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The head of B that a head-aware ``perm`` puts at each head of A: (num_heads,)."""
    head_dim = perm.numel() // num_heads
    return perm.reshape(num_heads, head_dim)[:, 0] // head_dim


def whole_head_permutation(head_of_a: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The perm that moves B's head ``head_of_a[h]`` to head h, keeping the order of dims within each head."""
    return (head_of_a[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def orthogonal_procrustes(cross: torch.Tensor) -> torch.Tensor:
    """The orthogonal T minimising E‖x_a − T x_b‖² given ``cross`` = E[x_a x_bᵀ]: T = U Vᵀ for cross = U S Vᵀ."""
    left, _, right_t = torch.linalg.svd(cross.double())
    return left @ right_t


def ones_complement_basis(size: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """An orthonormal basis (size, size − 1) of the directions orthogonal to the all-ones vector."""
    with_ones = torch.cat([torch.ones(size, 1, dtype=dtype), torch.eye(size, dtype=dtype)[:, : size - 1]], dim=1)
    return torch.linalg.qr(with_ones).Q[:, 1:]


def fixing_ones(inner: torch.Tensor) -> torch.Tensor:
    """The (d, d) map that is ``inner`` (d − 1, d − 1) on the complement of the all-ones direction (in the basis of
    `ones_complement_basis`) and the identity along it; orthogonal when ``inner`` is."""
    size = inner.shape[0] + 1
    basis = ones_complement_basis(size).to(inner.device)
    return torch.full((size, size), 1.0 / size, dtype=torch.float64, device=inner.device) + basis @ inner @ basis.T


def procrustes_fixing_ones(cross: torch.Tensor) -> torch.Tensor:
    """The orthogonal T with T 1 = 1 that maximises tr(Tᵀ cross), ``cross`` = E[x_a x_bᵀ] (d, d): Procrustes on the
    complement of the all-ones direction, identity along it (what LayerNorm's centring needs to commute)."""
    basis = ones_complement_basis(cross.shape[0]).to(cross.device)
    return fixing_ones(orthogonal_procrustes(basis.T @ cross.double() @ basis))


def head_procrustes(cross: torch.Tensor, head_of_a: torch.Tensor, num_heads: int) -> torch.Tensor:
    """One orthogonal map per head of A from B's paired head: (num_heads, head_dim, head_dim).

    Args:
        cross: (d, d) cross moment E[x_a x_bᵀ] of the group's features (rows A, columns B), B in its own order.
        head_of_a: (num_heads,) B's head paired with each head of A.
        num_heads: heads in the group.
    """
    blocks = _head_blocks(cross, num_heads)  # (H_a, H_b, hd, hd)
    return torch.stack([orthogonal_procrustes(blocks[h, int(head_of_a[h])]) for h in range(num_heads)])


# Residual variants: which of the residual feature points (embeddings LayerNorm, then per layer the attention and
# FF LayerNorms) feed the correlation; several points have their covariances averaged, as in the paper.
RESIDUAL_POINTS: dict[str, slice] = {"all": slice(None), "first": slice(0, 1), "last": slice(-1, None)}


def _assign(block: torch.Tensor) -> tuple[np.ndarray, float]:
    """Within-block assignment: (cols in A's row order, total matched correlation)."""
    values = _as_numpy(block)
    rows, cols = linear_sum_assignment(values, maximize=True)
    ordered = np.empty(len(rows), dtype=np.int64)
    ordered[rows] = cols
    return ordered, float(values[rows, cols].sum())


def _head_blocks(corr: torch.Tensor, num_heads: int) -> torch.Tensor:
    _check_square(corr)
    if corr.shape[0] % num_heads:
        raise DataError(f"correlation of size {corr.shape[0]} cannot be split into {num_heads} heads")
    head_dim = corr.shape[0] // num_heads
    # (H*hd, H*hd) -> (H_a, hd, H_b, hd) -> (H_a, H_b, hd, hd)
    return corr.reshape(num_heads, head_dim, num_heads, head_dim).permute(0, 2, 1, 3)


def _compose(num_heads: int, head_dim: int, head_of_a: np.ndarray, inner: Callable[[int], np.ndarray]) -> torch.Tensor:
    """perm[h*hd + j] = head_of_a[h]*hd + inner(h)[j]: B's head and within-head dim that go to A's (h, j)."""
    perm = [head_of_a[h] * head_dim + inner(h) for h in range(num_heads)]
    return torch.from_numpy(np.concatenate(perm).astype(np.int64))


def _check_square(corr: torch.Tensor) -> None:
    if corr.ndim != 2 or corr.shape[0] != corr.shape[1]:
        raise DataError(f"matching needs a square correlation matrix, got shape {tuple(corr.shape)}")
    if not torch.isfinite(corr).all():
        raise DataError("the matrix to match has NaN or inf entries: the models or their statistics are not finite")


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float64).numpy()
