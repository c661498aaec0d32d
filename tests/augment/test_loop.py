"""The loop: no leakage of the held-out target dev split, determinism, resume mid-episode."""
import pytest
import torch

from kdfast.augment.data import split_target
from kdfast.augment.loop import AugmentConfig, AugmentLoop

from .conftest import tiny_model


def _cfg(method="full", **kw):
    base = dict(method=method, episodes=2, candidates_per_episode=4, episode_steps=2, warmup_steps=2,
                final_steps=3, mlm_steps=3, mlm_hidden_size=32, batch_size=4, max_seq_length=128, doc_stride=48,
                retrieve_k=2)
    return AugmentConfig(**{**base, **kw})


def _loop(cfg, d, tok, teacher, out):
    return AugmentLoop(cfg, source=d["source"], target=d["target"], eval_records=d["eval"], teacher=teacher,
                       student=tiny_model(tok, seed=3), tokenizer=tok, output_dir=str(out))


def test_split_by_passage(aug_data):
    train, dev = split_target(aug_data["target"], 5, seed=0)
    assert len(dev) >= 5 and len(train) + len(dev) == len(aug_data["target"])
    assert not {r["context"] for r in train} & {r["context"] for r in dev}
    assert not {r["id"] for r in train} & {r["id"] for r in dev}
    with pytest.raises(ValueError, match="too small"):
        split_target(aug_data["target"], 10_000, seed=0)


def test_resume_mid_episode_equals_uninterrupted_and_nothing_leaks(aug_data, aug_tok, aug_teacher, tmp_path):
    cfg = _cfg()
    full = _loop(cfg, aug_data, aug_tok, aug_teacher, tmp_path / "a")
    res_a = full.run()
    sd_a = {k: v.clone() for k, v in full.student.state_dict().items()}

    # Leakage: the held-out dev split (reward only) never reaches a training window.
    dev_ids = {r["id"] for r in full.dev}
    dev_ctx = {r["context"] for r in full.dev}
    from kdfast.augment.loop import load_state
    st = load_state(full.state_path)
    trained = full.train_windows + st["kept"]
    assert st["kept"], "the selector kept nothing: the test would prove little"
    for w in trained:
        base_id = w["example_id"].split("-aug")[0]
        assert w["example_id"] not in dev_ids and base_id not in dev_ids
    assert not {r["context"] for r in full.train} & dev_ctx
    assert not {r["id"] for r in aug_data["eval"]} & {w["example_id"] for w in trained}
    assert res_a["episodes"] and all("reward" in e for e in res_a["episodes"])

    # Stopped after the 'distil' phase of episode 0 (generate, select, distil = 3 phases), then resumed.
    stopped = _loop(cfg, aug_data, aug_tok, aug_teacher, tmp_path / "b")
    assert stopped.run(max_phases=3) is None
    mid = load_state(stopped.state_path)
    assert (mid["episode"], mid["phase"]) == (0, "update")
    resumed = _loop(cfg, aug_data, aug_tok, aug_teacher, tmp_path / "b")
    res_b = resumed.run(resume=True)
    assert res_b["eval"] == res_a["eval"] and res_b["kept"] == res_a["kept"]
    assert res_b["episodes"] == res_a["episodes"]
    for k, v in resumed.student.state_dict().items():
        assert torch.equal(v, sd_a[k]), k


@pytest.mark.parametrize("method", ["none", "mixkd", "source", "random", "confidence", "tinybert"])
def test_baselines_run(method, aug_data, aug_tok, aug_teacher, tmp_path):
    cfg = _cfg(method, episodes=1)
    res = _loop(cfg, aug_data, aug_tok, aug_teacher, tmp_path).run()
    assert set(res["eval"]) == {"f1", "exact_match"}
    if method == "none":
        assert res["kept"] == 0
    elif method in ("random", "confidence"):
        n = res["episodes"][0]["candidates"]
        assert res["kept"] == round(0.5 * n)
    else:
        assert res["kept"] > 0


def test_resume_refuses_another_method(aug_data, aug_tok, aug_teacher, tmp_path):
    _loop(_cfg("none", episodes=1), aug_data, aug_tok, aug_teacher, tmp_path).run()
    with pytest.raises(ValueError, match="not 'source'"):
        _loop(_cfg("source", episodes=1), aug_data, aug_tok, aug_teacher, tmp_path).run(resume=True)


def test_source_based_candidates(aug_data, aug_tok, aug_teacher, tmp_path, monkeypatch):
    """bases=("source",): every candidate is a question of a retrieved source passage (its own
    answer, at the recomputed offset), its masked runs filled with words of a target *train*
    passage (mix rate 1: no masked-LM refill), never with a word only the held-out dev has."""
    import kdfast.augment.loop as loop_mod

    loop = _loop(_cfg("random", episodes=1, bases=("source",), mask_rates=(0.5,), mix_rates=(1.0,)),
                 aug_data, aug_tok, aug_teacher, tmp_path)
    loop._setup()
    made = []
    real = loop_mod.manipulate
    monkeypatch.setattr(loop_mod, "manipulate", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    windows = loop._generate(0)
    assert len(made) == 4 and windows
    src = {r["id"]: r for r in aug_data["source"]}
    seen = {w for r in loop.train + aug_data["source"] for w in r["context"].split()}
    dev_only = {w for r in loop.dev for w in r["context"].split()} - seen
    assert dev_only, "no dev-only words: the leak check would prove nothing"
    for c in made:
        r = src[c["origin"]]
        assert c["id"].startswith(f"{r['id']}-saug") and c["strategy"]["base"] == "source"
        assert c["question"] == r["question"] and c["answers"]["text"] == r["answers"]["text"]
        start, text = c["answers"]["answer_start"][0], c["answers"]["text"][0]
        assert c["context"][start:start + len(text)] == text and c["context"] != r["context"]
        assert not set(c["context"].split()) & dev_only
    assert {w["strategy"]["base"] for w in windows} == {"source"}
    assert all(0 <= w["domain_index"] < len(loop.domains) for w in windows)


@pytest.mark.parametrize("stop_after", [1, 4])  # after episode 0's generate; after its update (episode 1 next)
def test_actor_critic_and_strategy_choice_resume(aug_data, aug_tok, aug_teacher, tmp_path, stop_after):
    """reward_baseline="critic" + choose_strategy: the candidates use the strategies the strategy
    policy drew, the log carries the critic's value as the baseline, and a run stopped mid-episode
    and resumed ends in the same state as an uninterrupted one."""
    from kdfast.augment.loop import load_state

    cfg = _cfg(reward_baseline="critic", choose_strategy=True, bases=("target", "source"))
    a = _loop(cfg, aug_data, aug_tok, aug_teacher, tmp_path / "a")
    assert a.run(max_phases=1) is None
    p = load_state(a.state_path)["pending"]
    assert len(p["strategy_indices"]) == cfg.candidates_per_episode
    drawn = {a.grid[i] for i in p["strategy_indices"]}
    for w in p["windows"]:
        assert any(w["strategy"] == dict(mask_rate=s.mask_rate, mix_rate=s.mix_rate, steps=s.steps,
                                         source_domain=s.source_domain, base=s.base) for s in drawn)
    res_a = _loop(cfg, aug_data, aug_tok, aug_teacher, tmp_path / "a").run(resume=True)
    first, second = res_a["episodes"]
    assert first["baseline"] == 0.0 and first["advantage"] == pytest.approx(first["reward"])
    assert "top_strategy" in first and 0 < first["top_strategy_prob"] <= 1
    assert second["advantage"] == pytest.approx(second["reward"] - second["baseline"])
    st_a = load_state(a.state_path)
    if first["reward"] != 0:  # a zero advantage leaves the strategy policy where it started
        assert not torch.equal(st_a["strategy_policy"]["logits"], torch.zeros(len(a.grid)))

    b = _loop(cfg, aug_data, aug_tok, aug_teacher, tmp_path / "b")
    assert b.run(max_phases=stop_after) is None
    res_b = _loop(cfg, aug_data, aug_tok, aug_teacher, tmp_path / "b").run(resume=True)
    assert res_b["episodes"] == res_a["episodes"] and res_b["eval"] == res_a["eval"]
    st_b = load_state(b.state_path)
    for k in ("strategy_policy", "critic", "policy"):
        for name, v in st_a[k].items():
            assert torch.equal(v, st_b[k][name]), (k, name)


def test_zero_rewards_warn_that_the_selector_did_not_learn(aug_data, aug_tok, aug_teacher, tmp_path, monkeypatch):
    import kdfast.augment.loop as loop_mod

    class Flat:  # a held-out F1 that never moves: every F1 reward is 0
        def __init__(self, *a, **k):
            pass

        def __call__(self, model):
            return {"f1": 0.0, "exact_match": 0.0}

    monkeypatch.setattr(loop_mod, "Scorer", Flat)
    logs = []
    loop = AugmentLoop(_cfg(), source=aug_data["source"], target=aug_data["target"], eval_records=aug_data["eval"],
                       teacher=aug_teacher, student=tiny_model(aug_tok, seed=3), tokenizer=aug_tok,
                       output_dir=str(tmp_path / "f1"), log=logs.append)
    res = loop.run()
    assert res["rewarded_episodes"] == 0 and any("reward was 0 in all 2 episodes" in m for m in logs)
    logs.clear()
    loop = AugmentLoop(_cfg(reward="dev_loss"), source=aug_data["source"], target=aug_data["target"],
                       eval_records=aug_data["eval"], teacher=aug_teacher, student=tiny_model(aug_tok, seed=3),
                       tokenizer=aug_tok, output_dir=str(tmp_path / "dl"), log=logs.append)
    res = loop.run()
    assert res["rewarded_episodes"] == 2 and not any("warning" in m for m in logs)


def test_config_errors():
    with pytest.raises(ValueError, match="method"):
        AugmentConfig(method="nope")
    with pytest.raises(ValueError, match="dev_fraction"):
        AugmentConfig(dev_fraction=0.0)
    with pytest.raises(ValueError, match="bases: unknown or empty"):
        AugmentConfig(bases=("target", "passage"))
    with pytest.raises(ValueError, match="bases: unknown or empty"):
        AugmentConfig(bases=())
    with pytest.raises(ValueError, match="reward_baseline: unknown 'mean'"):
        AugmentConfig(reward_baseline="mean")


def test_dev_loss_reward_is_the_decrease_of_the_dev_loss(aug_data, aug_tok, aug_teacher, tmp_path):
    """reward="dev_loss": each episode's reward is 100 x (dev loss before - after its distil steps),
    the losses those of the students the checkpoints hold, recomputed here."""
    from kdfast.augment.distil import mean_loss
    from kdfast.augment.loop import load_state

    cfg = _cfg(reward="dev_loss", episodes=1)
    loop = _loop(cfg, aug_data, aug_tok, aug_teacher, tmp_path / "r")
    assert loop.run(max_phases=3) is None  # generate, select, distil of episode 0: the reward is computed
    st = load_state(loop.state_path)
    p = st["pending"]
    student = tiny_model(aug_tok, seed=3).eval()
    dev_w = loop.dev_windows
    student.load_state_dict(st["warm_student"])
    before = mean_loss(student, dev_w, aug_tok, temperature=cfg.temperature, alpha=cfg.alpha)
    student.load_state_dict(st["student"])
    after = mean_loss(student, dev_w, aug_tok, temperature=cfg.temperature, alpha=cfg.alpha)
    assert before != after
    assert p["dev_loss_before"] == pytest.approx(before, rel=1e-5)
    assert p["reward"] == pytest.approx(100 * (before - after), rel=1e-4, abs=1e-4)
    res = _loop(cfg, aug_data, aug_tok, aug_teacher, tmp_path / "r").run(resume=True)
    assert res["episodes"][0]["reward"] == pytest.approx(p["reward"])
    assert res["episodes"][0]["dev_loss"] == pytest.approx(after, rel=1e-5)
    with pytest.raises(ValueError, match="reward: unknown 'bleu'"):
        AugmentConfig(reward="bleu")
