"""Dense Euclidean graphs: pairwise distances, exact minimum spanning trees, quantiles.

The topology metrics (GRTD, LBTC) need the exact MST of complete graphs whose edge weights may be
exactly zero (points of the same class in a label graph). ``scipy.sparse.csgraph`` reads a zero
entry as "no edge" and silently returns a forest, so this module runs its own Prim's algorithm on
the dense matrix: O(n^2) time, O(n) extra memory, one vectorised row update per added vertex.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ._validation import check_features

# Number of sampled entries used to bracket a quantile before the exact selection.
_QUANTILE_SAMPLE = 65536
# Entries per row block when finishing the Gram identity (512 Ki float64 = 4 MB).
_ROW_BLOCK_ENTRIES = 524288


def pairwise_distances(X) -> np.ndarray:
    """Euclidean distance matrix of the rows of ``X``, float64.

    Uses the Gram identity ``||x_i - x_j||^2 = ||x_i||^2 + ||x_j||^2 - 2 <x_i, x_j>`` on the
    column-centred features (centring does not change distances but removes most of the
    cancellation error of the identity), clips the rounding negatives at 0 and sets the diagonal
    to exactly 0. Memory is one (n, n) array; no (n, n, D) intermediate is formed.

    Parameters
    ----------
    X : array-like of shape (n, D)
        Finite features.

    Returns
    -------
    dist : ndarray of shape (n, n)
        Symmetric, non-negative, zero diagonal. The absolute error of an entry is about
        ``1e-8 * max_i ||x_i - mean||`` (square root of the float64 rounding of the identity).

    Shape:
        - X: (n, D)
        - dist: (n, n)
    """
    X = check_features(X)
    Xc = X - X.mean(axis=0)
    sq = np.einsum("ij,ij->i", Xc, Xc)
    dist = Xc @ Xc.T
    # Finish the identity in row blocks of ~4 MB so the five elementwise passes stay in cache
    # instead of streaming the whole (n, n) matrix through memory five times.
    block = max(1, _ROW_BLOCK_ENTRIES // dist.shape[0])
    for start in range(0, dist.shape[0], block):
        rows = dist[start:start + block]
        rows *= -2.0
        rows += sq[start:start + block, None]
        rows += sq[None, :]
        np.maximum(rows, 0.0, out=rows)
        np.sqrt(rows, out=rows)
    np.fill_diagonal(dist, 0.0)
    return dist


def prim_mst(row: Callable[[int], np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact MST of a complete graph on ``n`` vertices whose weights are given row by row.

    ``row(v)`` returns the (n,) vector of edge weights from vertex ``v`` to every vertex (finite,
    >= 0; the entry at ``v`` itself is ignored). Rows are requested once per vertex, so a caller
    can build a derived graph (for example a label-induced one) on the fly without an (n, n)
    copy. Ties are broken towards the lowest vertex index, so the tree is deterministic.

    Returns the (n-1, 2) edges as (parent, child) in the order Prim adds them, starting from
    vertex 0, and their (n-1,) weights.
    """
    edges = np.empty((max(n - 1, 0), 2), dtype=np.int64)
    weights = np.empty(max(n - 1, 0), dtype=np.float64)
    if n < 2:
        return edges, weights
    # Vertices already in the tree carry an infinite penalty, which keeps them out of both the
    # argmin and the update without a per-step boolean mask.
    penalty = np.zeros(n)
    best = np.full(n, np.inf)
    parent = np.zeros(n, dtype=np.int64)
    candidate = np.empty(n)
    closer = np.empty(n, dtype=bool)
    v = 0
    for k in range(n - 1):
        penalty[v] = np.inf
        best[v] = np.inf
        np.add(row(v), penalty, out=candidate)
        np.less(candidate, best, out=closer)
        np.copyto(best, candidate, where=closer)
        np.copyto(parent, v, where=closer)
        v = int(np.argmin(best))
        edges[k] = parent[v], v
        weights[k] = best[v]
    return edges, weights


def mst_edges(dist) -> tuple[np.ndarray, np.ndarray]:
    """Exact minimum spanning tree of a dense symmetric weight matrix (Prim, O(n^2)).

    Unlike ``scipy.sparse.csgraph.minimum_spanning_tree``, a zero entry is an edge of weight 0,
    not a missing edge, so graphs with coincident points or zero within-class weights give a
    spanning tree, never a forest.

    Parameters
    ----------
    dist : array-like of shape (n, n)
        Symmetric matrix of finite, non-negative edge weights; the diagonal is ignored.

    Returns
    -------
    edges : ndarray of shape (n-1, 2), int64
        (parent, child) vertex pairs in the order Prim adds them from vertex 0.
    weights : ndarray of shape (n-1,), float64
        Edge weights; ``weights.sum()`` is the MST weight.

    Shape:
        - dist: (n, n)
        - edges: (n-1, 2)
        - weights: (n-1,)

    Raises
    ------
    ValueError
        If ``dist`` is not square, contains NaN/inf or negative weights.
    """
    D = check_features(dist, name="dist")
    if D.shape[0] != D.shape[1]:
        raise ValueError(f"dist must be a square (n, n) matrix, got shape {D.shape}")
    if (D < 0).any():
        raise ValueError("dist has negative edge weights; an MST of distances needs weights >= 0")
    return prim_mst(D.__getitem__, D.shape[0])


def full_quantile(values: np.ndarray, q: float) -> float:
    """``np.quantile(values, q)`` (linear interpolation) over every entry, without a full sort.

    A sample of entries brackets the two order statistics needed; one counting pass and a
    selection inside the bracket then give the exact value (the sample only affects speed). If
    the bracket misses, which the +-1% rank margin (about 8 standard errors of the sample
    quantile) makes very unlikely, it falls back to ``np.quantile``.
    """
    flat = values.reshape(-1)
    size = flat.size
    if size <= 4 * _QUANTILE_SAMPLE:
        return float(np.quantile(flat, q))
    position = q * (size - 1)
    lo_rank = int(np.floor(position))
    hi_rank = min(lo_rank + 1, size - 1)
    # Random rather than strided positions: a stride can align with the rows of a distance
    # matrix and sample a few points' distances only, which biases the bracket.
    picks = np.random.default_rng(0).integers(0, size, _QUANTILE_SAMPLE)
    sample = np.sort(flat[picks])
    margin = _QUANTILE_SAMPLE // 100
    centre = int(q * (_QUANTILE_SAMPLE - 1))
    lo = sample[max(centre - margin, 0)]
    hi = sample[min(centre + margin, _QUANTILE_SAMPLE - 1)]
    n_below = int(np.count_nonzero(flat < lo))
    band = flat[(flat >= lo) & (flat <= hi)]
    if not (n_below <= lo_rank and hi_rank < n_below + band.size):
        return float(np.quantile(flat, q))
    picked = np.partition(band, [lo_rank - n_below, hi_rank - n_below])
    low = picked[lo_rank - n_below]
    high = picked[hi_rank - n_below]
    return float(low + (high - low) * (position - lo_rank))
