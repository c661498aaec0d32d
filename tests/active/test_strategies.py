"""Active-learning strategies and k-center selection on crafted inputs with known answers."""
import itertools
import math
import tracemalloc

import numpy as np
import pytest

from kdfast.active.kcenter import k_center_greedy, k_means_pp, nearest_distance
from kdfast.active.strategies import (
    PoolView, Strategy, available_strategies, get_strategy, register, register_strategy,
)


def nb(*probs, texts=None):
    """An n-best list with the given probabilities (texts default to 't0', 't1', ...)."""
    texts = texts or [f"t{i}" for i in range(len(probs))]
    return [{"text": t, "probability": p, "start_logit": 0.0, "end_logit": 0.0} for t, p in zip(texts, probs)]


def pool_of(nbests, **kw):
    ids = [f"q{i}" for i in range(len(nbests))]
    return PoolView(ids=ids, nbest=dict(zip(ids, nbests)), **kw)


RNG = np.random.default_rng(0)


# ---------------------------------------------------------------- uncertainty
def test_margin_picks_smallest_margins():
    pool = pool_of([nb(0.9, 0.1), nb(0.5, 0.45, 0.05), nb(0.4, 0.35, 0.25), nb(1.0), nb(0.6, 0.2, 0.2)])
    s = get_strategy("margin").score(pool)
    np.testing.assert_allclose(s, [-0.8, -0.05, -0.05, -1.0, -0.4])
    # q1 and q2 tie at margin 0.05: pool order breaks the tie.
    assert get_strategy("margin").select(pool, 3, RNG) == ["q1", "q2", "q4"]


def test_margin_uses_the_two_largest_even_if_unsorted():
    pool = pool_of([nb(0.2, 0.7, 0.1)])
    np.testing.assert_allclose(get_strategy("margin").score(pool), [-0.5])


def test_entropy_picks_flattest():
    dists = [nb(0.9, 0.1), nb(0.25, 0.25, 0.25, 0.25), nb(1.0), nb(0.5, 0.5), nb(0.4, 0.3, 0.3)]
    pool = pool_of(dists)
    s = get_strategy("entropy").score(pool)
    for i, d in enumerate(dists):
        p = np.array([e["probability"] for e in d])
        assert s[i] == pytest.approx(-(p * np.log(p)).sum())
    assert s[2] == 0.0
    assert get_strategy("entropy").select(pool, 2, RNG) == ["q1", "q4"]


def test_least_confidence_picks_lowest_top_probability():
    pool = pool_of([nb(0.9, 0.1), nb(0.3, 0.3, 0.2, 0.2), nb(0.6, 0.4), nb(0.5, 0.49, 0.01)])
    np.testing.assert_allclose(get_strategy("least_confidence").score(pool), [0.1, 0.7, 0.4, 0.5])
    assert get_strategy("least_confidence").select(pool, 2, RNG) == ["q1", "q3"]


# ---------------------------------------------------------------- BALD
def test_bald_agreeing_passes_give_zero_disagreeing_high():
    agree = nb(0.7, 0.3, texts=["a", "b"])
    passes = [{"q0": agree, "q1": nb(1.0, texts=["a"])},
              {"q0": agree, "q1": nb(1.0, texts=["b"])},
              {"q0": agree, "q1": nb(1.0, texts=["c"])}]
    pool = PoolView(ids=["q0", "q1"], mc_nbest=passes)
    s = get_strategy("bald").score(pool)
    assert s[0] == pytest.approx(0.0, abs=1e-12)
    assert s[1] == pytest.approx(math.log(3))  # the maximum for 3 passes
    assert get_strategy("bald").select(pool, 1, RNG) == ["q1"]


def test_bald_two_pass_hand_computed_and_equal_texts_summed():
    # Pass 1: "a" appears twice (0.5 + 0.3 = 0.8), "b" 0.2.  Pass 2: a 0.2, b 0.8.
    passes = [{"q": nb(0.5, 0.3, 0.2, texts=["a", "a", "b"])}, {"q": nb(0.8, 0.2, texts=["b", "a"])}]
    s = get_strategy("bald").score(PoolView(ids=["q"], mc_nbest=passes))
    h_each = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))
    assert s[0] == pytest.approx(math.log(2) - h_each)
    assert s[0] == pytest.approx(0.19274, abs=1e-5)


def test_bald_text_absent_in_a_pass_has_probability_zero():
    passes = [{"q": nb(0.5, 0.5, texts=["a", "b"])}, {"q": nb(1.0, texts=["a"])}]
    s = get_strategy("bald").score(PoolView(ids=["q"], mc_nbest=passes))
    mean = np.array([0.75, 0.25])
    expected = -(mean * np.log(mean)).sum() - 0.5 * (math.log(2) + 0.0)
    assert s[0] == pytest.approx(expected)


# ---------------------------------------------------------------- disagreement
def np_kl(t, s):
    p = np.exp(t - t.max())
    p /= p.sum()
    q = np.exp(s - s.max())
    q /= q.sum()
    return float((p * (np.log(p) - np.log(q))).sum())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_disagreement_equals_numpy_kl_and_takes_max_over_windows(dtype):
    rng = np.random.default_rng(1)
    student, teacher, expected = {}, {}, []
    lengths = {"q0": [7, 12], "q1": [5], "q2": [9, 3, 11]}
    for q, lens in lengths.items():
        student[q], teacher[q] = [], []
        win_kl = []
        for L in lens:
            ss, se, ts, te = (3.0 * rng.standard_normal(L) for _ in range(4))
            student[q].append((ss, se))
            teacher[q].append((ts, te))
            win_kl.append(np_kl(ts, ss) + np_kl(te, se))
        expected.append(max(win_kl))
    pool = PoolView(ids=list(lengths), student_logits=student, teacher_logits=teacher)
    s = get_strategy("disagreement", dtype=dtype).score(pool)
    tol = 1e-5 if dtype == "float32" else 1e-10
    np.testing.assert_allclose(s, expected, rtol=tol, atol=tol)


def test_disagreement_second_window_decides():
    agree = (np.array([1.0, 2.0, 0.5]), np.array([0.0, 3.0, 1.0]))
    mild_s = (np.array([1.0, 0.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0, 0.0]))
    mild_t = (np.array([1.2, 0.0, 0.0, 0.0]), np.array([0.0, 1.3, 0.0, 0.0]))
    strong_s = (np.array([5.0, 0.0, 0.0, 0.0, 0.0]), np.array([0.0, 0.0, 5.0, 0.0, 0.0]))
    strong_t = (np.array([0.0, 0.0, 0.0, 0.0, 5.0]), np.array([5.0, 0.0, 0.0, 0.0, 0.0]))
    pool = PoolView(ids=["first_only_agrees", "mild"],
                    student_logits={"first_only_agrees": [agree, strong_s], "mild": [mild_s]},
                    teacher_logits={"first_only_agrees": [agree, strong_t], "mild": [mild_t]})
    s = get_strategy("disagreement").score(pool)
    strong = np_kl(strong_t[0], strong_s[0]) + np_kl(strong_t[1], strong_s[1])
    assert s[0] == pytest.approx(strong, rel=1e-5)
    assert s[1] < 0.1 < strong
    assert get_strategy("disagreement").select(pool, 1, RNG) == ["first_only_agrees"]


def test_disagreement_bad_windows():
    s, t = (np.zeros(3), np.zeros(3)), (np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="window 0"):
        get_strategy("disagreement").score(PoolView(ids=["q"], student_logits={"q": [s]}, teacher_logits={"q": [t]}))
    with pytest.raises(ValueError, match="2 student windows but 1 teacher"):
        get_strategy("disagreement").score(PoolView(ids=["q"], student_logits={"q": [s, s]},
                                                    teacher_logits={"q": [s]}))


# ---------------------------------------------------------------- k-center
def brute_greedy(points, n, labeled=None, candidates=None):
    """The k-center greedy definition, step by step with exact distances."""
    cand = list(range(len(points))) if candidates is None else list(candidates)
    centers = [] if labeled is None else [c for c in labeled]
    picked = []
    for _ in range(n):
        best, best_d = None, -1.0
        for i in cand:
            if i in picked:
                continue
            if centers:
                d = min(np.linalg.norm(points[i] - c) for c in centers)
            else:
                d = np.linalg.norm(points[i] - points[cand].mean(axis=0))
            if d > best_d:
                best, best_d = i, d
        picked.append(best)
        centers.append(points[best])
    return picked


def radius(points, centers):
    return max(min(np.linalg.norm(p - c) for c in centers) for p in points)


@pytest.mark.parametrize("seed", range(6))
def test_k_center_greedy_matches_definition_and_is_2_approx(seed):
    rng = np.random.default_rng(seed)
    pts = rng.standard_normal((10, 3)) * 4.0
    lab = rng.standard_normal((2, 3)) * 4.0
    for n in range(1, 5):
        for labeled in (None, lab):
            got = k_center_greedy(pts, n, labeled=labeled)
            assert got == brute_greedy(pts, n, labeled), (n, labeled is None)
            fixed = [] if labeled is None else list(labeled)
            greedy_r = radius(pts, fixed + [pts[i] for i in got])
            opt_r = min(radius(pts, fixed + [pts[i] for i in sub]) for sub in itertools.combinations(range(10), n))
            assert greedy_r <= 2.0 * opt_r + 1e-12
        cand = rng.permutation(10)[:7]
        assert k_center_greedy(pts, n, labeled=lab, candidates=cand) == brute_greedy(pts, n, lab, cand)
        assert k_center_greedy(pts, n, candidates=cand) == brute_greedy(pts, n, None, cand)


def test_k_center_greedy_chunking_and_dtype_do_not_change_the_pick():
    rng = np.random.default_rng(3)
    pts, lab = rng.standard_normal((301, 17)), rng.standard_normal((53, 17))
    ref = k_center_greedy(pts, 12, labeled=lab)
    assert k_center_greedy(pts, 12, labeled=lab, chunk_elems=97) == ref
    assert k_center_greedy(pts.astype(np.float32), 12, labeled=lab.astype(np.float32)) == ref
    assert len(set(ref)) == 12
    d = nearest_distance(pts, lab, chunk_elems=50)
    np.testing.assert_allclose(d, np.linalg.norm(pts[:, None] - lab[None], axis=-1).min(1), rtol=1e-9)


def test_k_center_greedy_memory_is_bounded():
    rng = np.random.default_rng(4)
    pts = rng.standard_normal((20000, 32)).astype(np.float32)
    lab = rng.standard_normal((2000, 32)).astype(np.float32)  # a full distance matrix: 320 MB in float64
    tracemalloc.start()
    try:
        got = k_center_greedy(pts, 5, labeled=lab, chunk_elems=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(set(got)) == 5
    assert peak < 40 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_k_center_greedy_duplicates_and_edges():
    pts = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    assert sorted(k_center_greedy(pts, 3)) == [0, 1, 2]
    assert k_center_greedy(pts, 0) == []
    with pytest.raises(ValueError, match="n must be in"):
        k_center_greedy(pts, 4)
    with pytest.raises(ValueError, match="labeled must have dim 2"):
        k_center_greedy(pts, 1, labeled=np.zeros((1, 3)))
    with pytest.raises(ValueError, match="candidates"):
        k_center_greedy(pts, 1, candidates=[0, 5])


def test_k_means_pp_deterministic_distinct_and_spread():
    rng = np.random.default_rng(5)
    # 4 tight clusters far apart: D^2 sampling almost surely hits each once.
    centers = np.array([[0, 0], [100, 0], [0, 100], [100, 100]], dtype=float)
    pts = np.concatenate([c + 0.01 * rng.standard_normal((20, 2)) for c in centers])
    a = k_means_pp(pts, 4, np.random.default_rng(7))
    assert a == k_means_pp(pts, 4, np.random.default_rng(7))
    assert sorted(i // 20 for i in a) == [0, 1, 2, 3]
    assert sorted(k_means_pp(np.zeros((5, 2)), 5, np.random.default_rng(0))) == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------- coreset, hybrid, badge
def test_coreset_select_and_score():
    emb = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [0.0, 5.0]])
    pool = PoolView(ids=["a", "b", "c", "d"], embeddings=emb, labeled_embeddings=np.array([[0.0, 0.0]]))
    cs = get_strategy("coreset")
    np.testing.assert_allclose(cs.score(pool), [0.0, 1.0, 10.0, 5.0])
    assert cs.select(pool, 2, RNG) == ["c", "d"]
    # No labeled set: first pick is farthest from the pool mean (2.75, 1.25) -> c.
    assert get_strategy("coreset").select(PoolView(ids=pool.ids, embeddings=emb), 1, RNG) == ["c"]


def test_hybrid_picks_from_uncertain_set_and_avoids_duplicates():
    # q0, q1: identical embeddings, equal high uncertainty; q2: uncertain-ish, diverse; q3 next to q2;
    # q3..q9: certain and far away (a pure core-set would pick them).
    ids = [f"q{i}" for i in range(10)]
    nbests = [nb(0.5, 0.5), nb(0.5, 0.5), nb(0.6, 0.4), nb(0.62, 0.38)] + [nb(0.99, 0.01)] * 6
    emb = np.array([[1.0, 1.0], [1.0, 1.0], [-1.0, 2.0], [-1.0, 2.1]] + [[50.0 * k, -40.0] for k in range(1, 7)])
    pool = PoolView(ids=ids, nbest=dict(zip(ids, nbests)), embeddings=emb,
                    labeled_embeddings=np.array([[0.0, 0.0]]))
    assert get_strategy("margin").select(pool, 2, RNG) == ["q0", "q1"]
    h = get_strategy("hybrid", prefilter=2)  # candidates: the 4 most uncertain
    picked = h.select(pool, 2, RNG)
    assert set(picked) <= {"q0", "q1", "q2", "q3"}
    assert len({"q0", "q1"} & set(picked)) == 1 and len({"q2", "q3"} & set(picked)) == 1
    assert set(get_strategy("coreset").select(pool, 2, RNG)) <= set(ids[4:])
    np.testing.assert_allclose(h.score(pool), get_strategy("margin").score(pool))
    assert get_strategy("hybrid", uncertainty="entropy").needs == {"nbest", "embeddings"}
    with pytest.raises(ValueError, match="prefilter"):
        get_strategy("hybrid", prefilter=0.5)


def test_badge_uses_grad_embeddings():
    g = np.array([[0.0, 0.0], [0.0, 0.01], [30.0, 0.0], [30.0, 0.01]])
    pool = PoolView(ids=["a", "b", "c", "d"], grad_embeddings=g)
    picked = get_strategy("badge").select(pool, 2, np.random.default_rng(0))
    assert {p in ("a", "b") for p in picked} == {True, False}
    np.testing.assert_allclose(get_strategy("badge").score(pool), np.linalg.norm(g, axis=1))


# ---------------------------------------------------------------- random, registry, errors
def test_random_is_deterministic_per_seed_and_differs_across_seeds():
    pool = PoolView(ids=[f"q{i}" for i in range(50)])
    r = get_strategy("random")
    a = r.select(pool, 10, np.random.default_rng(123))
    assert a == r.select(pool, 10, np.random.default_rng(123))
    assert len(set(a)) == 10
    assert a != r.select(pool, 10, np.random.default_rng(124))
    assert sorted(r.select(pool, 50, np.random.default_rng(1))) == sorted(pool.ids)


def test_registry_unknown_name_lists_available():
    with pytest.raises(ValueError) as e:
        get_strategy("no_such_strategy")
    for name in ("random", "margin", "entropy", "bald", "coreset", "hybrid", "disagreement"):
        assert name in str(e.value)
    assert {"least_confidence", "badge"} <= set(available_strategies())


def test_user_registered_strategy():
    @register("test_answer_length")
    class AnswerLength(Strategy):
        """score = length of the best answer text."""
        needs = frozenset({"nbest"})

        def score(self, pool):
            self.check(pool)
            return np.array([len(pool.nbest[q][0]["text"]) for q in pool.ids], dtype=float)

    pool = pool_of([nb(1.0, texts=["ab"]), nb(1.0, texts=["abcd"]), nb(1.0, texts=["a"])])
    s = get_strategy("test_answer_length")
    assert s.name == "test_answer_length" and "test_answer_length" in available_strategies()
    assert s.select(pool, 2, RNG) == ["q1", "q0"]
    with pytest.raises(ValueError, match="taken"):
        register_strategy(type("Other", (Strategy,), {}), "test_answer_length")
    with pytest.raises(ValueError, match="needs PoolView.nbest"):
        s.select(PoolView(ids=["q"]), 1, RNG)


@pytest.mark.parametrize("name,field", [("margin", "nbest"), ("bald", "mc_nbest"), ("coreset", "embeddings"),
                                        ("disagreement", "student_logits"), ("badge", "grad_embeddings"),
                                        ("hybrid", "embeddings")])
def test_missing_field_error_names_strategy_and_field(name, field):
    # hybrid gets its uncertainty input (nbest) but lacks embeddings; the others get nothing.
    pool = pool_of([nb(1.0), nb(0.5, 0.5)]) if name == "hybrid" else PoolView(ids=["q0", "q1"])
    with pytest.raises(ValueError, match=rf"'{name}' needs PoolView\.{field}"):
        get_strategy(name).select(pool, 1, RNG)


def test_n_validation():
    pool = pool_of([nb(1.0), nb(0.5, 0.5)])
    for name in ("margin", "random"):
        with pytest.raises(ValueError, match=r"n must be in \[0, 2\]"):
            get_strategy(name).select(pool, 3, RNG)
        with pytest.raises(ValueError, match="n must be in"):
            get_strategy(name).select(pool, -1, RNG)
        assert get_strategy(name).select(pool, 0, RNG) == []
    with pytest.raises(ValueError, match="n must be an integer"):
        get_strategy("margin").select(pool, 1.5, RNG)


def test_pool_view_validation():
    with pytest.raises(ValueError, match="unique"):
        PoolView(ids=["a", "a"])
    with pytest.raises(ValueError, match="embeddings must have shape"):
        PoolView(ids=["a", "b"], embeddings=np.zeros((3, 4)))
    with pytest.raises(ValueError, match="no entry for question 'b'"):
        get_strategy("entropy").score(PoolView(ids=["a", "b"], nbest={"a": nb(1.0)}))
    with pytest.raises(ValueError, match="'probability'"):
        get_strategy("entropy").score(PoolView(ids=["a"], nbest={"a": [{"text": "x"}]}))
