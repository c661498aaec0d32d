"""Teacher-to-student layer mappings for :class:`kdfast.nn.LayerKD`.

Layers are numbered from 1 (``hidden_states[m]`` is the output of layer m; the
embeddings, ``hidden_states[0]``, always meet through LayerKD's ``"embedding"`` term).
M = student layers, N = teacher layers.

Hard mappings (one teacher layer per mapped student layer, :func:`layer_mapping`):

- ``"uniform"``: m <- m * N // M (TinyBERT's g(m) = m N / M; the last layers meet).
- ``"skip"``: m <- m * stride (default stride N // M; equals ``"uniform"`` when M divides N).
- ``"first_k"``: the first k student layers <- the first k teacher layers (m <- m; default k = M).
- ``"last_k"``: the last k student layers <- the last k teacher layers (m <- m + N - M; default k = M).
- ``"random"``: a sorted random subset of M teacher layers (monotone; with replacement when
  M > N), drawn from ``seed`` and the epoch: :meth:`LayerMapping.resample` draws the next one.
- a list of M teacher layers (``None`` skips a student layer), or of (student, teacher) pairs.

Soft mappings (a student layer matches several teacher layers, :class:`LayerMapping`):

- ``"mean"``: student layer m matches the contiguous block ``((m-1) N // M, m N // M]`` of
  teacher layers. Hidden terms: the student's output is compared with the *mean of the block's
  hidden states*. Attention terms: the loss is the *mean over the block of the per-teacher-layer
  attention losses*. For the score MSE this has the gradient of the MSE to the block's mean score
  map (the two differ by a constant, the block's score variance), and for KL(teacher || student)
  the gradient of KL to the block's mean attention distribution (they differ by the block's
  entropy spread), so "mean of losses" is "loss to the mean map" without L x L maps.
- ``"learned"``: every student layer m matches a softmax-weighted mix of all N teacher layers,
  ``w[m] = softmax(logits[m])``, the ``[M, N]`` logits an ``nn.Parameter`` trained with the
  student (initialised to 0: the uniform mix). Hidden terms compare with ``sum_j w[m, j] h_t[j]``;
  attention terms take ``sum_j w[m, j] * loss(student m, teacher j)`` (the mix of losses, as for
  ``"mean"``). :meth:`LayerMapping.weights` returns the current ``[M, N]`` weights.
"""
from __future__ import annotations

import torch
from torch import nn

HARD_MAPPINGS = ("uniform", "skip", "first_k", "last_k", "random")
SOFT_MAPPINGS = ("mean", "learned")
MAPPINGS = HARD_MAPPINGS + SOFT_MAPPINGS


def _check_counts(M, N):
    if M < 1 or N < 1:
        raise ValueError(f"layer_mapping: layer counts must be >= 1, got student {M}, teacher {N}")


def random_monotone(num_student: int, num_teacher: int, seed: int = 0, epoch: int = 0) -> list[int]:
    """A sorted random choice of ``num_student`` teacher layers (1-based), reproducible from
    ``(seed, epoch)``: without replacement when M <= N, else with replacement (still sorted)."""
    M, N = int(num_student), int(num_teacher)
    _check_counts(M, N)
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    if M <= N:
        pick = torch.randperm(N, generator=g)[:M]
    else:
        pick = torch.randint(0, N, (M,), generator=g)
    return sorted(int(t) + 1 for t in pick)


def mean_blocks(num_student: int, num_teacher: int) -> list[list[int]]:
    """The teacher layers (1-based) each student layer averages under ``"mean"``: block m is
    ``((m-1) N // M, m N // M]``; when M > N a block that would be empty is ``[ceil(m N / M)]``."""
    M, N = int(num_student), int(num_teacher)
    _check_counts(M, N)
    out = []
    for m in range(1, M + 1):
        lo, hi = (m - 1) * N // M, m * N // M
        out.append(list(range(lo + 1, hi + 1)) or [-(-m * N // M)])
    return out


def layer_mapping(num_student: int, num_teacher: int, mapping="uniform", *, k: int | None = None,
                  stride: int | None = None, seed: int = 0, epoch: int = 0) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs of a hard mapping, layers numbered from 1 (see the module
    docstring). ``"mean"`` and ``"learned"`` give every (student, teacher) pair they read."""
    M, N = int(num_student), int(num_teacher)
    _check_counts(M, N)
    if isinstance(mapping, str):
        if mapping == "uniform":
            return [(m, m * N // M) for m in range(1, M + 1) if m * N // M >= 1]
        if mapping in ("last_k", "first_k"):
            k = M if k is None else int(k)
            if not 1 <= k <= min(M, N):
                raise ValueError(f"layer_mapping: k must be in [1, {min(M, N)}], got {k}")
            if mapping == "first_k":
                return [(m, m) for m in range(1, k + 1)]
            return [(m, m + N - M) for m in range(M - k + 1, M + 1)]
        if mapping == "skip":
            stride = max(1, N // M) if stride is None else int(stride)
            if stride < 1:
                raise ValueError(f"layer_mapping: stride must be >= 1, got {stride}")
            return [(m, m * stride) for m in range(1, M + 1) if m * stride <= N]
        if mapping == "random":
            return list(zip(range(1, M + 1), random_monotone(M, N, seed, epoch)))
        if mapping == "mean":
            return [(m, t) for m, block in enumerate(mean_blocks(M, N), 1) for t in block]
        if mapping == "learned":
            return [(m, t) for m in range(1, M + 1) for t in range(1, N + 1)]
        raise ValueError(f"layer_mapping: mapping must be one of {', '.join(MAPPINGS)} or a list, got {mapping!r}")
    items = list(mapping)
    if items and all(isinstance(x, (tuple, list)) for x in items):
        pairs = [(int(a), int(b)) for a, b in items]
    else:
        if len(items) != M:
            raise ValueError(f"layer_mapping: an explicit list must give one teacher layer per student layer "
                             f"({M}), got {len(items)}")
        pairs = [(m, int(t)) for m, t in zip(range(1, M + 1), items) if t is not None]
    for s, t in pairs:
        if not (1 <= s <= M and 1 <= t <= N):
            raise ValueError(f"layer_mapping: pair ({s}, {t}) out of range (student 1..{M}, teacher 1..{N})")
    return pairs


class LayerMapping(nn.Module):
    """One mapping (hard or soft) as a module: the ``"learned"`` logits are its parameter.

    ``groups()`` -> list of ``(student_layer, [teacher layers], weights)``; ``weights`` is None for a
    single teacher layer, a list of floats for ``"mean"`` and a ``[n]`` tensor (softmax of the
    logits, differentiable) for ``"learned"``.
    """

    def __init__(self, num_student: int, num_teacher: int, mapping="uniform", *, k=None, stride=None,
                 seed: int = 0):
        super().__init__()
        self.num_student, self.num_teacher = int(num_student), int(num_teacher)
        self.spec = mapping if isinstance(mapping, str) else list(mapping)
        self.k, self.stride, self.seed, self.epoch = k, stride, int(seed), 0
        self.kind = mapping if isinstance(mapping, str) and mapping in ("random", "mean", "learned") else "hard"
        self.pairs = layer_mapping(self.num_student, self.num_teacher, mapping, k=k, stride=stride, seed=seed)
        if self.kind == "learned":
            self.logits = nn.Parameter(torch.zeros(self.num_student, self.num_teacher))
        else:
            self.logits = None

    def resample(self, epoch: int) -> None:
        """Start of ``epoch``: a ``"random"`` mapping draws its subset for that epoch (a no-op for the
        others)."""
        self.epoch = int(epoch)
        if self.kind == "random":
            self.pairs = layer_mapping(self.num_student, self.num_teacher, "random", seed=self.seed,
                                       epoch=self.epoch)

    def weights(self) -> torch.Tensor | None:
        """``[M, N]`` softmax weights of a ``"learned"`` mapping (row m: student layer m over teacher
        layers 1..N), else None."""
        return None if self.logits is None else torch.softmax(self.logits.float(), dim=-1)

    def groups(self):
        M, N = self.num_student, self.num_teacher
        if self.kind == "mean":
            return [(m, block, [1.0 / len(block)] * len(block)) for m, block in enumerate(mean_blocks(M, N), 1)]
        if self.kind == "learned":
            w = self.weights()
            return [(m, list(range(1, N + 1)), w[m - 1]) for m in range(1, M + 1)]
        return [(s, [t], None) for s, t in self.pairs]

    def student_layers(self) -> list[int]:
        return sorted({s for s, _ in self.pairs})

    def teacher_layers(self) -> list[int]:
        return sorted({t for _, t in self.pairs})

    def extra_repr(self):
        return f"{self.spec!r}, pairs={self.pairs}"
