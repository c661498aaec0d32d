"""Question-level active-learning strategies for extractive QA.

A strategy reads precomputed model outputs for the unlabeled pool (a
:class:`PoolView`, one entry per question) and returns scores (higher = query
first) and a selection of question ids. Strategies are pure functions of their
inputs: no model, no I/O; numpy in, numpy out (``disagreement`` calls
``kdfast.ops.kd_loss`` on CPU tensors).

    from kdfast.active.strategies import PoolView, get_strategy
    pool = PoolView(ids=ids, nbest=nbest, embeddings=emb)
    picked = get_strategy("hybrid", prefilter=3).select(pool, 100, np.random.default_rng(0))

Add your own by subclassing :class:`Strategy` and registering it::

    @register("longest_question")
    class Longest(Strategy):
        needs = frozenset({"nbest"})
        def score(self, pool):
            self.check(pool)
            return np.array([len(pool.nbest[q][0]["text"]) for q in pool.ids], float)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kdfast.active.kcenter import k_center_greedy, k_means_pp, nearest_distance

__all__ = [
    "PoolView", "Strategy", "register", "register_strategy", "get_strategy", "available_strategies",
    "RandomStrategy", "LeastConfidence", "Margin", "Entropy", "BALD", "CoreSet", "Hybrid", "Badge",
    "Disagreement",
]

POOL_FIELDS = ("nbest", "mc_nbest", "embeddings", "labeled_embeddings", "student_logits", "teacher_logits",
               "grad_embeddings")


@dataclass
class PoolView:
    """What a strategy may read about the unlabeled pool, one entry per question.

    Attributes:
        ids: question ids, in pool order (unique).
        nbest: per question id, its n-best spans across all its windows, best
            first: dicts with ``"text"``, ``"probability"`` (softmax over the
            n-best scores, sums to 1), ``"start_logit"``, ``"end_logit"``.
        mc_nbest: the same n-best dicts from T stochastic (MC-dropout) passes.
        embeddings: ``[n_questions, d]`` pooled encoder embeddings, rows in ``ids`` order.
        labeled_embeddings: ``[n_labeled, d]`` embeddings of the labeled set.
        student_logits, teacher_logits: per question id, a list over its windows
            of ``(start_logits, end_logits)`` 1-D float arrays restricted to
            the tokens where the answer may be (context tokens + CLS).
        grad_embeddings: ``[n_questions, g]`` BADGE gradient embeddings.
    """

    ids: list
    nbest: dict | None = None
    mc_nbest: list | None = None
    embeddings: np.ndarray | None = None
    labeled_embeddings: np.ndarray | None = None
    student_logits: dict | None = None
    teacher_logits: dict | None = None
    grad_embeddings: np.ndarray | None = None

    def __post_init__(self):
        self.ids = list(self.ids)
        for q in self.ids:
            if not isinstance(q, str):
                raise ValueError(f"PoolView.ids must be strings, got {q!r}")
        if len(set(self.ids)) != len(self.ids):
            dup = next(q for i, q in enumerate(self.ids) if q in self.ids[:i])
            raise ValueError(f"PoolView.ids must be unique, {dup!r} repeats")
        for name in ("embeddings", "grad_embeddings"):
            arr = getattr(self, name)
            if arr is not None:
                arr = np.asarray(arr)
                if arr.ndim != 2 or arr.shape[0] != len(self.ids):
                    raise ValueError(f"PoolView.{name} must have shape [{len(self.ids)}, dim] (one row per id), "
                                     f"got {arr.shape}")
                setattr(self, name, arr)
        if self.labeled_embeddings is not None:
            lab = np.asarray(self.labeled_embeddings)
            if lab.ndim != 2:
                raise ValueError(f"PoolView.labeled_embeddings must be 2-D [n_labeled, dim], got {lab.shape}")
            if self.embeddings is not None and lab.shape[0] and lab.shape[1] != self.embeddings.shape[1]:
                raise ValueError(f"PoolView.labeled_embeddings dim {lab.shape[1]} differs from "
                                 f"embeddings dim {self.embeddings.shape[1]}")
            self.labeled_embeddings = lab
        if self.mc_nbest is not None:
            self.mc_nbest = list(self.mc_nbest)
            if not self.mc_nbest:
                raise ValueError("PoolView.mc_nbest must hold at least one pass (or be None)")

    def __len__(self) -> int:
        return len(self.ids)


# --------------------------------------------------------------------------
# Base class and registry
# --------------------------------------------------------------------------
class Strategy:
    """Base class: subclasses set ``needs`` and implement ``score``.

    ``score(pool)`` returns ``[len(pool)]`` floats, higher = query first.
    ``select(pool, n, rng)`` returns ``n`` question ids; the default takes the
    top ``n`` scores, ties in pool order.
    """

    name: str = ""
    needs: frozenset = frozenset()

    def check(self, pool: PoolView) -> None:
        """Raise ValueError naming the strategy and field if a needed PoolView field is None."""
        if not isinstance(pool, PoolView):
            raise ValueError(f"strategy {self.name!r}: pool must be a PoolView, got {type(pool).__name__}")
        for field in sorted(self.needs):
            if getattr(pool, field, None) is None:
                raise ValueError(f"strategy {self.name!r} needs PoolView.{field}, which is missing (None)")

    def score(self, pool: PoolView) -> np.ndarray:
        """``[len(pool)]`` float scores, higher = query first."""
        raise NotImplementedError(f"strategy {self.name!r} ({type(self).__name__}) does not implement score")

    def select(self, pool: PoolView, n: int, rng: np.random.Generator | None = None) -> list[str]:
        """The ``n`` question ids with the highest scores (ties: pool order)."""
        n = self._check_select(pool, n)
        scores = self._checked_scores(pool)
        order = np.argsort(-scores, kind="stable")[:n]
        return [pool.ids[i] for i in order]

    def _check_select(self, pool, n) -> int:
        self.check(pool)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise ValueError(f"strategy {self.name!r}: n must be an integer, got {n!r}")
        if n < 0 or n > len(pool):
            raise ValueError(f"strategy {self.name!r}: n must be in [0, {len(pool)}] (the pool size), got {n}")
        return int(n)

    def _checked_scores(self, pool) -> np.ndarray:
        s = np.asarray(self.score(pool), dtype=np.float64)
        if s.shape != (len(pool),):
            raise ValueError(f"strategy {self.name!r}: score returned shape {s.shape}, expected ({len(pool)},)")
        if np.isnan(s).any():
            bad = pool.ids[int(np.flatnonzero(np.isnan(s))[0])]
            raise ValueError(f"strategy {self.name!r}: score is NaN for question {bad!r}")
        return s

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r})"


_REGISTRY: dict[str, type] = {}


def register_strategy(cls: type, name: str | None = None, *, replace: bool = False) -> type:
    """Register a Strategy subclass under ``name`` (default ``cls.name``); returns ``cls``.

    Sets ``cls.name``. Registering another class under a taken name raises
    unless ``replace=True``.
    """
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ValueError(f"register_strategy needs a Strategy subclass, got {cls!r}")
    name = name or cls.name
    if not isinstance(name, str) or not name:
        raise ValueError(f"strategy name must be a non-empty string, got {name!r}")
    old = _REGISTRY.get(name)
    if old is not None and old is not cls and not replace:
        raise ValueError(f"strategy name {name!r} is taken by {old.__name__}; pass replace=True to override")
    cls.name = name
    _REGISTRY[name] = cls
    return cls


def register(name: str, *, replace: bool = False):
    """Class decorator: ``@register("my_strategy")`` registers a Strategy subclass."""
    return lambda cls: register_strategy(cls, name, replace=replace)


def available_strategies() -> list[str]:
    """Registered strategy names, sorted."""
    return sorted(_REGISTRY)


def get_strategy(name: str, **kwargs) -> Strategy:
    """A new instance of the strategy registered as ``name``, built with ``kwargs``.

    Raises ValueError listing the available names for an unknown name.
    """
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"unknown strategy {name!r}; available: {', '.join(available_strategies())}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"strategy {name!r}: bad arguments {sorted(kwargs)}: {e}") from e


# --------------------------------------------------------------------------
# n-best helpers
# --------------------------------------------------------------------------
def _entries(table, qid, field):
    if qid not in table:
        raise ValueError(f"PoolView.{field} has no entry for question {qid!r}")
    entries = table[qid]
    if not entries:
        raise ValueError(f"PoolView.{field}[{qid!r}] is empty")
    return entries


def _probs(entries, qid, field) -> np.ndarray:
    try:
        p = np.array([float(e["probability"]) for e in entries], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"PoolView.{field}[{qid!r}]: every entry needs a numeric 'probability' ({e})") from e
    if not np.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"PoolView.{field}[{qid!r}]: probabilities must be finite, >= 0, not all 0; got {p}")
    return p


def _entropy(p: np.ndarray) -> float:
    """Shannon entropy in nats of a distribution (renormalised), with 0 log 0 = 0."""
    p = p / p.sum()
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum())


def _per_question(pool, fn) -> np.ndarray:
    return np.array([fn(_probs(_entries(pool.nbest, q, "nbest"), q, "nbest")) for q in pool.ids], dtype=np.float64)


# --------------------------------------------------------------------------
# Built-in strategies
# --------------------------------------------------------------------------
@register("random")
class RandomStrategy(Strategy):
    """Uniform sampling without replacement with ``rng`` (same seed, same ids).

    ``score`` is 0 for every question (no preference).
    """

    needs = frozenset()

    def score(self, pool):
        self.check(pool)
        return np.zeros(len(pool))

    def select(self, pool, n, rng=None):
        n = self._check_select(pool, n)
        if rng is None:
            raise ValueError("strategy 'random' needs rng (a numpy Generator or a seed)")
        picked = np.random.default_rng(rng).choice(len(pool), size=n, replace=False)
        return [pool.ids[i] for i in picked]


@register("least_confidence")
class LeastConfidence(Strategy):
    """score = 1 - p(best span), the best span being the n-best entry of highest probability."""

    needs = frozenset({"nbest"})

    def score(self, pool):
        self.check(pool)
        return _per_question(pool, lambda p: 1.0 - p.max())


@register("margin")
class Margin(Strategy):
    """score = -(p1 - p2): p1, p2 the two highest span probabilities (smallest margin first).

    A question with a single n-best entry has p2 = 0, so margin p1.
    """

    needs = frozenset({"nbest"})

    def score(self, pool):
        self.check(pool)

        def neg_margin(p):
            top = np.sort(p)[::-1]
            return -(top[0] - (top[1] if top.size > 1 else 0.0))

        return _per_question(pool, neg_margin)


@register("entropy")
class Entropy(Strategy):
    """score = -sum_i p_i log p_i (nats) over the question's n-best probabilities (flattest first).

    The probabilities are renormalised to sum to 1 (a no-op for post-processing output).
    """

    needs = frozenset({"nbest"})

    def score(self, pool):
        self.check(pool)
        return _per_question(pool, _entropy)


@register("bald")
class BALD(Strategy):
    """MC-dropout BALD (Houlsby et al., 2011; Gal et al., 2017) over T passes.

    For each pass t the answer distribution p_t is over answer TEXTS: the
    probabilities of n-best entries with equal text are summed, renormalised to
    1 within the pass; a text absent from a pass has probability 0 there.
    score = H(mean_t p_t) - mean_t H(p_t) in nats (mutual information between
    the answer and the dropout mask; 0 when all passes agree, at most log T).

    Spans are scored jointly: the span distribution already combines start and
    end logits (and windows), so there is no separate start/end BALD.
    """

    needs = frozenset({"mc_nbest"})

    def score(self, pool):
        self.check(pool)
        out = np.empty(len(pool))
        for i, q in enumerate(pool.ids):
            passes = []
            for t, table in enumerate(pool.mc_nbest):
                field = f"mc_nbest[{t}]"
                entries = _entries(table, q, field)
                p = _probs(entries, q, field)
                dist: dict = {}
                for e, pe in zip(entries, p):
                    if "text" not in e:
                        raise ValueError(f"PoolView.{field}[{q!r}]: every entry needs a 'text'")
                    dist[e["text"]] = dist.get(e["text"], 0.0) + pe
                passes.append(dist)
            texts = sorted(set().union(*passes))
            P = np.array([[d.get(x, 0.0) for x in texts] for d in passes])
            P = P / P.sum(axis=1, keepdims=True)
            mean_h = np.mean([_entropy(row) for row in P])
            out[i] = max(_entropy(P.mean(axis=0)) - mean_h, 0.0)  # >= 0 by Jensen; clip rounding
        return out


@register("coreset")
class CoreSet(Strategy):
    """Core-set selection (Sener & Savarese, 2018): k-center greedy on ``embeddings``.

    ``select`` repeatedly picks the question farthest (Euclidean) from the
    union of the labeled set and the questions picked so far; with no labeled
    set it starts with the question farthest from the pool mean
    (see :func:`kdfast.active.kcenter.k_center_greedy`).
    ``score`` = distance to the nearest labeled embedding (to the pool mean
    when there is no labeled set).
    """

    needs = frozenset({"embeddings"})

    def score(self, pool):
        self.check(pool)
        lab = pool.labeled_embeddings
        if lab is None or lab.shape[0] == 0:
            lab = np.asarray(pool.embeddings).mean(axis=0, dtype=np.float64, keepdims=True)
        return nearest_distance(pool.embeddings, lab)

    def select(self, pool, n, rng=None):
        n = self._check_select(pool, n)
        picked = k_center_greedy(pool.embeddings, n, labeled=pool.labeled_embeddings)
        return [pool.ids[i] for i in picked]


@register("hybrid")
class Hybrid(Strategy):
    """Uncertainty pre-filter, then k-center greedy among the uncertain questions.

    ``select(pool, n)`` takes the top ``ceil(prefilter * n)`` questions (at
    most the pool) by the ``uncertainty`` strategy's score (default
    ``margin``), then picks ``n`` of them by k-center greedy on
    ``embeddings`` against the labeled set. Many SQuAD questions share one
    passage and have near-identical embeddings and uncertainty; a top-n
    uncertainty selection spends the budget on such near-duplicates, and the
    k-center step keeps only one per cluster among the uncertain ones.

    Why this and not BADGE: BADGE needs per-question gradient embeddings
    (last-layer gradients of the span loss, ``[n, hidden * 2]`` for start/end
    heads), which the loop may not compute; this needs only the n-best lists
    and the pooled embeddings already used by ``coreset``, its two steps are
    deterministic, and ``prefilter`` sets the uncertainty/diversity trade-off
    (1 = pure uncertainty; pool / n = pure core-set). ``badge`` is available
    when ``grad_embeddings`` are given.

    ``score`` is the uncertainty strategy's score (the pre-filter ranking).
    """

    def __init__(self, prefilter: float = 3.0, uncertainty="margin", **uncertainty_kwargs):
        if isinstance(prefilter, bool) or not isinstance(prefilter, (int, float)) or not prefilter >= 1:
            raise ValueError(f"strategy 'hybrid': prefilter must be a number >= 1, got {prefilter!r}")
        self.prefilter = float(prefilter)
        if isinstance(uncertainty, Strategy):
            if uncertainty_kwargs:
                raise ValueError("strategy 'hybrid': pass uncertainty kwargs only with an uncertainty name")
            self.uncertainty = uncertainty
        else:
            self.uncertainty = get_strategy(uncertainty, **uncertainty_kwargs)
        self.needs = frozenset(self.uncertainty.needs | {"embeddings"})

    def score(self, pool):
        self.check(pool)
        return self.uncertainty.score(pool)

    def select(self, pool, n, rng=None):
        n = self._check_select(pool, n)
        if n == 0:
            return []
        k = min(len(pool), math.ceil(self.prefilter * n))
        top = np.argsort(-self._checked_scores(pool), kind="stable")[:k]
        picked = k_center_greedy(pool.embeddings, n, labeled=pool.labeled_embeddings, candidates=top)
        return [pool.ids[i] for i in picked]


@register("badge")
class Badge(Strategy):
    """BADGE (Ash et al., 2020): k-means++ seeding on ``grad_embeddings``.

    ``select`` draws ``n`` questions by k-means++ seeding with ``rng`` (first
    uniform, then proportional to the squared distance to the nearest drawn
    one), so it trades magnitude (uncertainty) against diversity.
    ``score`` = the gradient embedding's Euclidean norm.
    """

    needs = frozenset({"grad_embeddings"})

    def score(self, pool):
        self.check(pool)
        return np.linalg.norm(np.asarray(pool.grad_embeddings, dtype=np.float64), axis=1)

    def select(self, pool, n, rng=None):
        n = self._check_select(pool, n)
        if rng is None:
            raise ValueError("strategy 'badge' needs rng (a numpy Generator or a seed)")
        return [pool.ids[i] for i in k_means_pp(pool.grad_embeddings, n, rng)]


@register("disagreement")
class Disagreement(Strategy):
    """Teacher-student disagreement: the largest per-window KL of a question.

    For each window w of a question:
    ``KL_w = KL(softmax(t_start) || softmax(s_start)) + KL(softmax(t_end) || softmax(s_end))``
    at temperature 1 (plain KL, no T^2), over the window's answer tokens.
    score = max_w KL_w (a question is as uncertain as its worst window).

    All windows of the pool are padded with -inf to one length (exact: -inf
    entries add nothing) and go through one ``kdfast.ops.kd_loss(...,
    reduction="none", scale_by_t2=False)`` call on CPU tensors of ``dtype``
    (``"float32"``: the compiled kernel where built; ``"float64"``: the reference).
    """

    needs = frozenset({"student_logits", "teacher_logits"})

    def __init__(self, dtype: str = "float32"):
        if dtype not in ("float32", "float64"):
            raise ValueError(f"strategy 'disagreement': dtype must be 'float32' or 'float64', got {dtype!r}")
        self.dtype = dtype

    def score(self, pool):
        self.check(pool)
        import torch
        from kdfast.ops import kd_loss

        s_rows, t_rows, owner = [], [], []
        for i, q in enumerate(pool.ids):
            sw = _entries(pool.student_logits, q, "student_logits")
            tw = _entries(pool.teacher_logits, q, "teacher_logits")
            if len(sw) != len(tw):
                raise ValueError(f"question {q!r}: {len(sw)} student windows but {len(tw)} teacher windows")
            for w, (s_pair, t_pair) in enumerate(zip(sw, tw)):
                for side, s, t in zip(("start", "end"), _pair(s_pair, q, w, "student"), _pair(t_pair, q, w, "teacher")):
                    if s.shape != t.shape or s.ndim != 1 or s.size == 0:
                        raise ValueError(f"question {q!r} window {w}: {side} logits must be non-empty 1-D arrays "
                                         f"of equal length, got student {s.shape} and teacher {t.shape}")
                    if np.isnan(s).any() or np.isnan(t).any():
                        raise ValueError(f"question {q!r} window {w}: {side} logits contain NaN")
                    s_rows.append(s)
                    t_rows.append(t)
                owner.append(i)
        if not s_rows:
            return np.zeros(0)
        width = max(r.size for r in s_rows)
        dt = np.float32 if self.dtype == "float32" else np.float64
        S = np.full((len(s_rows), width), -np.inf, dtype=dt)
        T = np.full((len(t_rows), width), -np.inf, dtype=dt)
        for r, (s, t) in enumerate(zip(s_rows, t_rows)):
            S[r, :s.size] = s
            T[r, :t.size] = t
        with torch.no_grad():
            kl = kd_loss(torch.from_numpy(S), torch.from_numpy(T), temperature=1.0, divergence="kl",
                         reduction="none", scale_by_t2=False).double().numpy()
        per_window = kl[0::2] + kl[1::2]
        out = np.full(len(pool), -np.inf)
        np.maximum.at(out, np.asarray(owner), per_window)
        return out


def _pair(pair, q, w, who):
    try:
        start, end = pair
    except (TypeError, ValueError) as e:
        raise ValueError(f"question {q!r} window {w}: {who} logits must be a (start, end) pair") from e
    return np.asarray(start, dtype=np.float64), np.asarray(end, dtype=np.float64)
