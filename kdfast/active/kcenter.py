"""Diversity selection over embeddings: k-center greedy and k-means++ seeding.

Both work on a running minimum-distance vector (one float per candidate), so a
selection of ``n`` points out of ``N`` in ``d`` dimensions costs O(n * N * d)
time and O(N) extra memory. Distances to a *set* of points (the labeled set)
are computed in blocks of at most ``chunk_elems`` pairwise entries, so no
``N x M`` matrix is ever held (N = 100k, M = 10k would be 8 GB in float64).

Squared distances use ``|x|^2 + |c|^2 - 2 x.c`` (one BLAS product per block,
norms in float64, clipped at 0): several times faster than forming ``x - c``
for every row, at the price of an absolute error near ``eps * |x| * |c|``,
which only matters between points closer than that.
"""
from __future__ import annotations

import numpy as np

__all__ = ["k_center_greedy", "k_means_pp", "nearest_distance"]

# Pairwise block size: 4M entries = 32 MB of float64 scratch per block.
DEFAULT_CHUNK_ELEMS = 1 << 22


def _as_points(name: str, x, d: int | None = None) -> np.ndarray:
    """A 2-D finite float array (float64 stays float64, anything else becomes float32)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [count, dim], got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name} must be numeric, got dtype {x.dtype}")
    if x.dtype != np.float64:
        x = x.astype(np.float32, copy=False)
    if d is not None and x.shape[1] != d:
        raise ValueError(f"{name} must have dim {d} like points, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _sq_norms(x: np.ndarray, rows: int = 8192) -> np.ndarray:
    """Row squared norms in float64, a block of rows at a time (no float64 copy of x)."""
    out = np.empty(x.shape[0])
    for r0 in range(0, x.shape[0], rows):
        b = x[r0:r0 + rows].astype(np.float64)
        out[r0:r0 + rows] = np.einsum("ij,ij->i", b, b)
    return out


def _min_sq_dist_to_set(x: np.ndarray, x_sq: np.ndarray, others: np.ndarray, chunk_elems: int) -> np.ndarray:
    """min_j |x_i - others_j|^2 for every row i, in blocks of <= chunk_elems pairs."""
    n, m = x.shape[0], others.shape[0]
    out = np.full(n, np.inf)
    if n == 0 or m == 0:
        return out
    o_sq = _sq_norms(others)
    cols = max(1, min(m, chunk_elems))
    rows = max(1, chunk_elems // cols)
    for c0 in range(0, m, cols):
        oc, oc_sq = others[c0:c0 + cols], o_sq[c0:c0 + cols]
        for r0 in range(0, n, rows):
            d2 = (x[r0:r0 + rows] @ oc.T).astype(np.float64, copy=False)  # [rows, cols]
            d2 *= -2.0  # in place: one float64 block of scratch, not four
            d2 += x_sq[r0:r0 + rows, None]
            d2 += oc_sq[None, :]
            np.minimum(out[r0:r0 + rows], d2.min(axis=1), out=out[r0:r0 + rows])
    return np.maximum(out, 0.0)


def _sq_dist_to_point(x: np.ndarray, x_sq: np.ndarray, c: np.ndarray) -> np.ndarray:
    """|x_i - c|^2 for every row i (one matrix-vector product, no [N, d] temporary)."""
    c_sq = float(np.dot(c.astype(np.float64), c.astype(np.float64)))
    return np.maximum(x_sq + c_sq - 2.0 * (x @ c), 0.0)


def nearest_distance(points, others, *, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> np.ndarray:
    """Euclidean distance from each point to its nearest neighbour in ``others``.

    Args:
        points: ``[N, d]`` array.
        others: ``[M, d]`` array (M >= 1).
        chunk_elems: largest number of pairwise distances held at once.

    Returns:
        ``[N]`` float64 array ``min_j |points_i - others_j|``.
    """
    x = _as_points("points", points)
    o = _as_points("others", others, x.shape[1])
    if o.shape[0] == 0:
        raise ValueError("others must hold at least one point")
    return np.sqrt(_min_sq_dist_to_set(x, _sq_norms(x), o, int(chunk_elems)))


def _candidate_index(candidates, n_points: int) -> np.ndarray:
    if candidates is None:
        return np.arange(n_points)
    idx = np.asarray(candidates)
    if idx.ndim != 1 or not (idx.size == 0 or np.issubdtype(idx.dtype, np.integer)):
        raise ValueError(f"candidates must be a 1-D array of integer indices into points, got {idx!r}")
    if idx.size and (idx.min() < 0 or idx.max() >= n_points):
        raise ValueError(f"candidates must be indices in [0, {n_points}), got range [{idx.min()}, {idx.max()}]")
    if np.unique(idx).size != idx.size:
        raise ValueError("candidates must not repeat an index")
    return idx.astype(np.int64)


def _check_n(n, available: int, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ValueError(f"n must be an integer, got {n!r}")
    if n < 0 or n > available:
        raise ValueError(f"n must be in [0, {available}] ({what}), got {n}")
    return int(n)


def k_center_greedy(points, n: int, labeled=None, candidates=None, *,
                    chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> list[int]:
    """Greedy k-center (Gonzalez; the core-set selection of Sener & Savarese, 2018).

    Repeatedly picks the candidate farthest (Euclidean) from the union of the
    labeled points and the points picked so far. With no labeled points, the
    first pick is the candidate farthest from the mean of the candidates. Ties
    go to the earliest candidate. The covering radius of ``labeled + picked``
    is at most twice that of the best possible choice of ``n`` candidates.

    Args:
        points: ``[N, d]`` embeddings (float64 is used as is, other dtypes as float32).
        n: how many to pick, ``0 <= n <= number of candidates``.
        labeled: optional ``[M, d]`` embeddings of already labeled points
            (vectors, not indices); ``None`` or ``M = 0`` means none.
        candidates: optional 1-D indices into ``points`` that may be picked
            (default: all). Only the candidates' distances are tracked.
        chunk_elems: largest number of pairwise distances held at once when
            measuring distances to the labeled set.

    Returns:
        ``n`` distinct indices into ``points``, in pick order.
    """
    x_all = _as_points("points", points)
    idx = _candidate_index(candidates, x_all.shape[0])
    n = _check_n(n, idx.size, f"{idx.size} candidates")
    if n == 0:
        return []
    x = x_all if candidates is None else x_all[idx]
    x_sq = _sq_norms(x)
    lab = None if labeled is None else _as_points("labeled", labeled, x.shape[1])
    if lab is not None and lab.shape[0] > 0:
        min_d2 = _min_sq_dist_to_set(x, x_sq, lab, int(chunk_elems))
    else:
        mean = x.mean(axis=0, dtype=np.float64).astype(x.dtype)
        min_d2 = None
    picked: list[int] = []
    for _ in range(n):
        if min_d2 is None:  # no labeled set: start farthest from the candidates' mean
            j = int(np.argmax(_sq_dist_to_point(x, x_sq, mean)))
            min_d2 = np.full(x.shape[0], np.inf)
        else:
            j = int(np.argmax(min_d2))
        picked.append(j)
        np.minimum(min_d2, _sq_dist_to_point(x, x_sq, x[j]), out=min_d2)
        min_d2[j] = -1.0  # never again, even when every distance left is 0 (duplicates)
    return [int(idx[j]) for j in picked]


def k_means_pp(points, n: int, rng: np.random.Generator) -> list[int]:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007), as BADGE uses on gradient embeddings.

    The first point is uniform; each next point is drawn with probability
    proportional to its squared distance to the nearest point drawn so far.
    Points already drawn are never drawn again; when every distance left is
    0 (duplicates only), the draw is uniform over the points not yet drawn.

    Args:
        points: ``[N, d]`` array.
        n: how many to draw, ``0 <= n <= N``.
        rng: ``np.random.Generator`` (or a seed); the result is deterministic for it.

    Returns:
        ``n`` distinct indices into ``points``, in draw order.
    """
    x = _as_points("points", points)
    n = _check_n(n, x.shape[0], f"{x.shape[0]} points")
    if rng is None:
        raise ValueError("rng must be a numpy Generator or a seed, got None")
    rng = np.random.default_rng(rng)
    if n == 0:
        return []
    x_sq = _sq_norms(x)
    free = np.ones(x.shape[0], dtype=bool)
    min_d2 = np.full(x.shape[0], np.inf)
    picked: list[int] = []
    for step in range(n):
        if step == 0:
            j = int(rng.integers(x.shape[0]))
        else:
            w = np.where(free, min_d2, 0.0)
            total = w.sum()
            w = w / total if total > 0 else free / free.sum()
            j = int(rng.choice(x.shape[0], p=w))
        picked.append(j)
        free[j] = False
        np.minimum(min_d2, _sq_dist_to_point(x, x_sq, x[j]), out=min_d2)
    return picked
