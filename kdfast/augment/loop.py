"""The learning-to-augment loop (Feng et al., AAAI 2021, for extractive QA) and its baselines.

Schedule: (teacher given or fine-tuned) -> warm the student up on the target train split ->
episodes of generate -> select -> teacher relabel -> distil -> reward -> policy update ->
final student, trained from the warmed-up state on the target train split plus every kept
sample, scored on the evaluation questions.

The target *train* data is split (by passage) into the training part and a held-out dev
part; the dev part only ever gives the selector's reward and is never trained on. The
evaluation questions are only scored at the end.

Every phase ends with an atomic checkpoint (``state.pt``: write to a temporary file, then
``os.replace``); every phase draws its randomness from ``(seed, episode, phase)``, so a run
stopped after any phase and resumed gives the same final state as an uninterrupted run.

The full method's selector subtracts a moving-average baseline from the reward (REINFORCE) or,
with ``reward_baseline="critic"``, a learned value (actor-critic); with ``choose_strategy`` its
policy also draws each candidate's generator strategy (otherwise drawn uniformly).

Methods: ``full`` (generator + reinforced selector), ``none`` (KD without augmentation),
``tinybert``, ``mixkd``, ``source`` (source added unchanged), ``random`` (generator, random
keep at ``keep_rate``), ``confidence`` (generator, keep the ``keep_rate`` most teacher-confident).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import zlib

import torch

from kdfast.augment import baselines as bl
from kdfast.augment.data import answered, relabel, split_target, to_windows
from kdfast.augment.distil import Scorer, mean_loss, span_stats, teacher_student_kl, train_steps
from kdfast.augment.generator import BASES, embed, manipulate, retrieve, strategy_grid
from kdfast.augment.selector import (Critic, MovingBaseline, Policy, StrategyPolicy, candidate_state,
                                     reinforce_loss, sample_actions, state_dim)

METHODS = ("full", "none", "tinybert", "mixkd", "source", "random", "confidence")
REWARDS = ("f1", "dev_loss")
REWARD_BASELINES = ("moving_average", "critic")
GENERATOR_METHODS = ("full", "random", "confidence")
MLM_METHODS = GENERATOR_METHODS + ("tinybert",)  # the methods that need a masked LM


@dataclasses.dataclass
class AugmentConfig:
    method: str = "full"
    episodes: int = 4
    candidates_per_episode: int = 32
    episode_steps: int = 8
    warmup_steps: int = 60
    final_steps: int = 150
    batch_size: int = 16
    learning_rate: float = 1e-3
    temperature: float = 2.0
    alpha: float = 0.5
    keep_rate: float = 0.5
    dev_fraction: float = 0.25
    policy_hidden: int = 32
    policy_learning_rate: float = 0.05
    baseline_beta: float = 0.8
    retrieve_k: int = 4
    mask_rates: tuple = (0.15, 0.3, 0.5)
    mix_rates: tuple = (0.0, 0.5, 1.0)
    chain_steps: tuple = (1, 2)
    # What the generator's candidates start from (kdfast.augment.generator.BASES): "target" (the
    # target questions, passages mixed with retrieved source text) and / or "source" (retrieved
    # source questions, passages mixed with the target passage's words).
    bases: tuple = ("target",)
    mlm_path: str | None = None
    mlm_steps: int = 300
    mlm_hidden_size: int = 64
    # Start the built-in MLM from this pretrained BERT-family model directory (e.g. a teacher
    # fine-tuned from a pretrained encoder) instead of random weights; its vocabulary must be the
    # tokenizer's. mlm_learning_rate None: 2e-3 from scratch, 1e-4 from mlm_init.
    mlm_init: str | None = None
    mlm_learning_rate: float | None = None
    tinybert_rate: float = 0.3
    mix_alpha: float = 0.4
    max_seq_length: int = 256
    doc_stride: int = 96
    seed: int = 0
    # The selector's reward: "f1" (the paper's: change of the student's F1 on the held-out target dev
    # split) or "dev_loss" (100 x the decrease of the student's KD + CE loss on that split: a
    # continuous signal where the split holds a handful of questions and F1 moves in big steps).
    reward: str = "f1"
    # The baseline subtracted from the reward: "moving_average" (REINFORCE) or "critic" (actor-critic:
    # a value network on the episode's mean candidate state, kdfast.augment.selector.Critic).
    reward_baseline: str = "moving_average"
    critic_learning_rate: float = 0.01
    # The optional second action of the full method: the policy also chooses which strategy of the
    # grid generates each candidate (kdfast.augment.selector.StrategyPolicy); default uniform sampling.
    choose_strategy: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method: unknown {self.method!r}; choose from {', '.join(METHODS)}")
        if self.reward not in REWARDS:
            raise ValueError(f"reward: unknown {self.reward!r}; choose from {', '.join(REWARDS)}")
        if self.reward_baseline not in REWARD_BASELINES:
            raise ValueError(f"reward_baseline: unknown {self.reward_baseline!r}; choose from "
                             f"{', '.join(REWARD_BASELINES)}")
        if not 0.0 < self.dev_fraction < 1.0:
            raise ValueError(f"dev_fraction: expected a value in (0, 1), got {self.dev_fraction}")
        if not 0.0 <= self.keep_rate <= 1.0:
            raise ValueError(f"keep_rate: expected a value in [0, 1], got {self.keep_rate}")
        self.mask_rates, self.mix_rates, self.chain_steps = (tuple(self.mask_rates), tuple(self.mix_rates),
                                                             tuple(self.chain_steps))
        self.bases = tuple(self.bases)
        bad = [b for b in self.bases if b not in BASES]
        if bad or not self.bases:
            raise ValueError(f"bases: unknown or empty {bad or list(self.bases)}; choose from {', '.join(BASES)}")


def _seed(*tags):
    return zlib.crc32(":".join(map(str, tags)).encode())


def _rng(*tags):
    return random.Random(_seed(*tags))


def _gen(*tags):
    g = torch.Generator()
    g.manual_seed(_seed(*tags))
    return g


def save_state(path, state):
    """Atomic checkpoint: a crash leaves the previous file or the new one, never half of one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def finetune_teacher(model, records, tokenizer, *, steps, batch_size=16, learning_rate=1e-3, seed=0,
                     max_seq_length=256, doc_stride=96):
    """Fine-tune a QA model on ``records`` (hard labels) for ``steps`` steps; returns it."""
    windows = to_windows(answered(records), tokenizer, max_seq_length, doc_stride)
    train_steps(model, windows, tokenizer, steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                seed=seed)
    return model.eval()


def target_split(config, target):
    """(train part, held-out dev part) of the target questions, as every run of ``config`` splits them."""
    return split_target(answered(target), max(1, round(config.dev_fraction * len(target))), config.seed)


def train_default_mlm(config, source, target_train, tokenizer, path, log=None):
    """The masked LM built in code (``config.mlm_hidden_size``, or the encoder of
    ``config.mlm_init``), trained ``config.mlm_steps`` steps on the source passages and the
    target's *train* part (never its held-out dev part) and saved to ``path``. Several methods of
    one study can share it (``AugmentConfig.mlm_path``)."""
    from kdfast.augment.mlm import build_mlm, train_mlm

    texts = sorted({r["context"] for r in answered(source) + list(target_train)})
    mlm = build_mlm(tokenizer, hidden_size=config.mlm_hidden_size, seed=config.seed, init=config.mlm_init)
    lr = config.mlm_learning_rate or (1e-4 if config.mlm_init else 2e-3)
    loss = train_mlm(mlm, tokenizer, texts, steps=config.mlm_steps, learning_rate=lr, seed=config.seed)
    if log:
        start = f" from {config.mlm_init}" if config.mlm_init else ""
        log(f"MLM{start} trained {config.mlm_steps} steps on {len(texts)} passages, loss {loss:.2f}")
    mlm.save_pretrained(path)
    return mlm


class AugmentLoop:
    """One run of one method. ``student`` is the initial student (its weights are the start of
    the warm-up); ``teacher`` a fine-tuned QA model; records in HF SQuAD column layout
    (``source`` records may carry ``domain``)."""

    def __init__(self, config, *, source, target, eval_records, teacher, student, tokenizer, output_dir,
                 log=None, progress=False):
        self.cfg, self.tok, self.out = config, tokenizer, output_dir
        self.teacher, self.student = teacher.eval(), student
        self.log = log or (lambda msg: None)
        self.progress = progress
        self.source = answered(source)
        self.train, self.dev = target_split(config, target)
        self.eval_records = eval_records
        self.domains = sorted({r.get("domain", "source") for r in self.source}) or ["source"]
        os.makedirs(output_dir, exist_ok=True)
        self.state_path = os.path.join(output_dir, "state.pt")
        c = config
        self.win = lambda recs: to_windows(recs, tokenizer, c.max_seq_length, c.doc_stride)
        self.train_windows = relabel(teacher, tokenizer, self.win(self.train))

    # --- setup ------------------------------------------------------------------------------
    def _mlm(self):
        from kdfast.augment.mlm import WholeWordFiller, load_mlm

        c = self.cfg
        path = c.mlm_path or os.path.join(self.out, "mlm")
        if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
            mlm = load_mlm(path)
        elif c.mlm_path:
            raise FileNotFoundError(f"mlm_path: no masked-LM directory at {c.mlm_path}")
        else:
            mlm = train_default_mlm(c, self.source, self.train, self.tok, path, self.log)
        return WholeWordFiller(mlm, self.tok)

    def _setup(self):
        c = self.cfg
        if c.method in MLM_METHODS:
            self.filler = self._mlm()
        if c.method == "tinybert":
            self.neighbours = bl.EmbeddingNeighbours(self.teacher.get_input_embeddings().weight, self.filler.allowed)
        if c.method in GENERATOR_METHODS or c.method == "full":
            ctxs = sorted({r["context"] for r in self.source})
            self.src_by_ctx = {}
            for r in self.source:
                self.src_by_ctx.setdefault(r["context"], []).append(r)
            self.src_ctx = {d: [x for x in ctxs if any(r["context"] == x and r.get("domain", "source") == d
                                                       for r in self.source)] for d in self.domains}
            tgt_ctx = [r["context"] for r in self.train]
            q = embed(self.teacher, self.tok, tgt_ctx)
            self.centroid = torch.nn.functional.normalize(q.mean(0), dim=0)
            self.neigh = {}
            for d, lst in self.src_ctx.items():
                idx = retrieve(q, embed(self.teacher, self.tok, lst), c.retrieve_k)
                self.neigh[d] = [[lst[j] for j in row] for row in idx.tolist()]
            self.grid = strategy_grid(self.domains, c.mask_rates, c.mix_rates, c.chain_steps, c.bases)

    def _fresh_state(self):
        c = self.cfg
        self.log(f"[{c.method}] warm-up: {c.warmup_steps} steps on {len(self.train)} target questions")
        train_steps(self.student, self.train_windows, self.tok, steps=c.warmup_steps, batch_size=c.batch_size,
                    learning_rate=c.learning_rate, seed=_seed(c.seed, "warmup"), temperature=c.temperature,
                    alpha=c.alpha)
        st = {"episode": 0, "phase": "generate", "kept": [], "log": [], "done": False,
              "warm_student": copy.deepcopy(self.student.state_dict()),
              "student": copy.deepcopy(self.student.state_dict()), "dev_f1": None}
        if c.method == "full":
            self.policy = Policy(state_dim(len(self.domains)), c.policy_hidden)
            st["dev_f1"] = self.dev_scorer(self.student)["f1"]
            if c.reward == "dev_loss":  # an extra dev pass only where the reward needs it
                st["dev_loss"] = self._dev_loss()
            st["policy"] = self.policy.state_dict()
            st["policy_opt"] = torch.optim.Adam(self.policy.parameters(), lr=c.policy_learning_rate).state_dict()
            st["baseline"] = MovingBaseline(c.baseline_beta).state_dict()
            if c.reward_baseline == "critic":
                critic = Critic(state_dim(len(self.domains)), c.policy_hidden)
                st["critic"] = critic.state_dict()
                st["critic_opt"] = torch.optim.Adam(critic.parameters(), lr=c.critic_learning_rate).state_dict()
            if c.choose_strategy:
                spol = StrategyPolicy(len(self.grid))
                st["strategy_policy"] = spol.state_dict()
                st["strategy_opt"] = torch.optim.Adam(spol.parameters(), lr=c.policy_learning_rate).state_dict()
        return st

    def _dev_loss(self):
        c = self.cfg
        if not hasattr(self, "dev_windows"):
            self.dev_windows = relabel(self.teacher, self.tok, self.win(self.dev))
        return mean_loss(self.student, self.dev_windows, self.tok, temperature=c.temperature, alpha=c.alpha)

    # --- phases -----------------------------------------------------------------------------
    def _generate(self, e):
        c = self.cfg
        rng, gen = _rng(c.seed, e, "generate"), _gen(c.seed, e, "generate")
        n = c.candidates_per_episode
        if c.method == "none":
            return []
        if c.method == "source":
            return self.win([dict(r, id=f"{r['id']}-src{e}") for r in rng.sample(self.source, min(n, len(self.source)))])
        if c.method == "mixkd":
            return bl.mix_windows(self.train_windows, n, rng=rng, alpha=c.mix_alpha)
        cands = []
        chosen = (self.strategy_policy.sample(n, _gen(c.seed, e, "strategy")).tolist()
                  if c.method == "full" and c.choose_strategy else None)
        self.strategy_indices = chosen
        for j in range(n):
            i = rng.randrange(len(self.train))
            rec = self.train[i]
            if c.method == "tinybert":
                cands.append(bl.tinybert_replace(rec, tokenizer=self.tok, filler=self.filler,
                                                 neighbours=self.neighbours, rate=c.tinybert_rate, rng=rng,
                                                 generator=gen, new_id=f"{rec['id']}-tb{e}-{j}"))
                continue
            s = self.grid[rng.randrange(len(self.grid)) if chosen is None else chosen[j]]
            src = self.neigh[s.source_domain][i][rng.randrange(len(self.neigh[s.source_domain][i]))]
            if s.base == "source":  # a question of the retrieved source passage, mixed with the target's words
                src_rec = rng.choice(self.src_by_ctx[src])
                out = manipulate(src_rec, s, source_text=rec["context"], filler=self.filler, tokenizer=self.tok,
                                 rng=rng, generator=gen, new_id=f"{src_rec['id']}-saug{e}-{j}")
            else:
                out = manipulate(rec, s, source_text=src, filler=self.filler, tokenizer=self.tok, rng=rng,
                                 generator=gen, new_id=f"{rec['id']}-aug{e}-{j}")
            out["domain_index"] = self.domains.index(s.source_domain)
            cands.append(out)
        windows = self.win(cands)
        by_id = {r["id"]: r for r in cands}
        for w in windows:
            r = by_id[w["example_id"]]
            w["strategy"], w["domain_index"] = r["strategy"], r.get("domain_index", -1)
        return windows

    def _states(self, windows, dev_f1):
        stats = span_stats(self.teacher, self.tok, windows)
        kl = teacher_student_kl(self.student, self.tok, windows)
        emb = embed(self.teacher, self.tok, [self.tok.decode(w["input_ids"], skip_special_tokens=True)
                                             for w in windows])
        sims = (emb @ self.centroid).tolist()
        return [candidate_state(s, k, m, w.get("strategy", {}), w.get("domain_index", -1), len(self.domains),
                                dev_f1 or 0.0) for s, k, m, w in zip(stats, kl, sims, windows)]

    def _select(self, e, windows, st):
        c = self.cfg
        if not windows:
            return [], None
        if c.method == "full":
            states = torch.tensor(self._states(windows, st["dev_f1"]))
            actions = sample_actions(self.policy, states, _gen(c.seed, e, "select"))
            return actions.tolist(), states
        n_keep = int(round(c.keep_rate * len(windows)))
        if c.method == "random":
            keep = set(_rng(c.seed, e, "select").sample(range(len(windows)), n_keep))
        elif c.method == "confidence":
            conf = [0.5 * (s["conf_start"] + s["conf_end"]) for s in span_stats(self.teacher, self.tok, windows)]
            keep = set(sorted(range(len(windows)), key=lambda i: -conf[i])[:n_keep])
        else:  # baselines without a selector keep everything they generate
            keep = set(range(len(windows)))
        return [1.0 if i in keep else 0.0 for i in range(len(windows))], None

    # --- run --------------------------------------------------------------------------------
    def run(self, *, resume=False, max_phases=None):
        """Run (or, with ``resume``, continue) the loop. ``max_phases``: stop after that many
        checkpointed phases (returns None) - how the tests stop a run mid-episode."""
        c = self.cfg
        self.dev_scorer = Scorer(self.dev, self.tok, c.max_seq_length, c.doc_stride)
        self._setup()
        if resume and os.path.exists(self.state_path):
            st = load_state(self.state_path)
            if st.get("method") != c.method:
                raise ValueError(f"resume: {self.state_path} is a {st.get('method')!r} run, not {c.method!r}")
            self.log(f"[{c.method}] resuming at episode {st['episode']} phase {st['phase']}")
        else:
            st = self._fresh_state()
            st["method"] = c.method
            save_state(self.state_path, st)
        self.student.load_state_dict(st["student"])
        if c.method == "full":
            self.policy = Policy(state_dim(len(self.domains)), c.policy_hidden)
            self.policy.load_state_dict(st["policy"])
            popt = torch.optim.Adam(self.policy.parameters(), lr=c.policy_learning_rate)
            popt.load_state_dict(st["policy_opt"])
            base = MovingBaseline()
            base.load_state_dict(st["baseline"])
            if c.reward_baseline == "critic":
                critic = Critic(state_dim(len(self.domains)), c.policy_hidden)
                critic.load_state_dict(st["critic"])
                copt = torch.optim.Adam(critic.parameters(), lr=c.critic_learning_rate)
                copt.load_state_dict(st["critic_opt"])
            if c.choose_strategy:
                self.strategy_policy = StrategyPolicy(len(self.grid))
                self.strategy_policy.load_state_dict(st["strategy_policy"])
                sopt = torch.optim.Adam(self.strategy_policy.parameters(), lr=c.policy_learning_rate)
                sopt.load_state_dict(st["strategy_opt"])
        phases = 0

        def checkpoint():
            nonlocal phases
            st["student"] = copy.deepcopy(self.student.state_dict())
            if c.method == "full":
                st["policy"], st["policy_opt"] = self.policy.state_dict(), popt.state_dict()
                st["baseline"] = base.state_dict()
                if c.reward_baseline == "critic":
                    st["critic"], st["critic_opt"] = critic.state_dict(), copt.state_dict()
                if c.choose_strategy:
                    st["strategy_policy"] = self.strategy_policy.state_dict()
                    st["strategy_opt"] = sopt.state_dict()
            save_state(self.state_path, st)
            phases += 1
            return max_phases is not None and phases >= max_phases

        from tqdm.auto import tqdm
        bar = tqdm(total=c.episodes, initial=st["episode"], desc=f"augment [{c.method}]", unit="episode",
                   disable=not self.progress)
        while st["episode"] < c.episodes and not st["done"]:
            e = st["episode"]
            if st["phase"] == "generate":
                windows = self._generate(e)
                st["pending"] = {"windows": relabel(self.teacher, self.tok, windows),
                                 "strategy_indices": getattr(self, "strategy_indices", None)}
                st["phase"] = "select"
                if checkpoint():
                    return None
            if st["phase"] == "select":
                actions, states = self._select(e, st["pending"]["windows"], st)
                st["pending"].update(actions=actions, states=states)
                st["phase"] = "distil" if c.method == "full" else "update"
                if checkpoint():
                    return None
            if st["phase"] == "distil":
                p = st["pending"]
                kept = [w for w, a in zip(p["windows"], p["actions"]) if a > 0.5]
                train_steps(self.student, kept + self.train_windows, self.tok, steps=c.episode_steps,
                            batch_size=c.batch_size, learning_rate=c.learning_rate, seed=_seed(c.seed, e, "distil"),
                            temperature=c.temperature, alpha=c.alpha)
                f1 = self.dev_scorer(self.student)["f1"]
                p["reward"], p["dev_f1_before"] = f1 - st["dev_f1"], st["dev_f1"]
                st["dev_f1"] = f1
                if c.reward == "dev_loss":
                    loss = self._dev_loss()
                    p["reward"], p["dev_loss_before"] = 100.0 * (st["dev_loss"] - loss), st["dev_loss"]
                    st["dev_loss"] = loss
                st["phase"] = "update"
                if checkpoint():
                    return None
            if st["phase"] == "update":
                p = st["pending"]
                entry = {"episode": e, "candidates": len(p["windows"]), "kept": int(sum(p["actions"]))}
                if c.method == "full" and p["windows"]:
                    if c.reward_baseline == "critic":
                        value = critic(p["states"])
                        adv = p["reward"] - float(value.detach())
                        copt.zero_grad()
                        ((value - p["reward"]) ** 2).backward()
                        copt.step()
                        baseline = float(value.detach())
                    else:
                        adv = base.advantage_and_update(p["reward"])
                        baseline = base.value
                    loss = reinforce_loss(self.policy, p["states"], torch.tensor(p["actions"]), adv)
                    popt.zero_grad()
                    loss.backward()
                    popt.step()
                    if c.choose_strategy and p.get("strategy_indices"):
                        sopt.zero_grad()
                        (-float(adv) * self.strategy_policy.log_prob(p["strategy_indices"])).backward()
                        sopt.step()
                        probs = self.strategy_policy.probs().detach()
                        entry.update(top_strategy=self.grid[int(probs.argmax())].name(),
                                     top_strategy_prob=float(probs.max()))
                    if c.reward == "dev_loss":
                        entry.update(dev_loss=st["dev_loss"])
                    entry.update(reward=p["reward"], advantage=adv, dev_f1=st["dev_f1"], baseline=baseline,
                                 keep_prob=float(self.policy.keep_prob(p["states"]).detach().mean()))
                st["kept"] += [w for w, a in zip(p["windows"], p["actions"]) if a > 0.5]
                st["log"].append(entry)
                self.log(f"[{c.method}] episode {e}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else
                                                                   f"{k} {v}" for k, v in entry.items()))
                st["pending"] = None
                st["episode"] += 1
                st["phase"] = "generate"
                bar.update(1)
                if checkpoint():
                    return None
        bar.close()
        rewarded = sum(1 for e in st["log"] if e.get("reward"))
        if c.method == "full" and st["log"] and not rewarded and not st["done"]:
            self.log(f"[full] warning: the reward was 0 in all {len(st['log'])} episodes (the student's {c.reward} on "
                     f"the {len(self.dev)} held-out questions never changed), so the selector kept its initial "
                     "policy: a random keep. More held-out questions or --reward dev_loss give it a signal.")
        if not st["done"]:
            self.student.load_state_dict(st["warm_student"])
            data = self.train_windows + st["kept"]
            train_steps(self.student, data, self.tok, steps=c.final_steps, batch_size=c.batch_size,
                        learning_rate=c.learning_rate, seed=_seed(c.seed, "final"), temperature=c.temperature,
                        alpha=c.alpha)
            st["final"] = Scorer(self.eval_records, self.tok, c.max_seq_length, c.doc_stride)(self.student)
            st["final_dev"] = self.dev_scorer(self.student)
            st["done"] = True
            st["student"] = copy.deepcopy(self.student.state_dict())
            save_state(self.state_path, st)
        self.student.load_state_dict(st["student"])
        result = {"method": c.method, "eval": st["final"], "held_out_dev": st["final_dev"],
                  "kept": len(st["kept"]), "target_train_questions": len(self.train),
                  "target_dev_questions": len(self.dev), "rewarded_episodes": rewarded, "episodes": st["log"]}
        with open(os.path.join(self.out, "augment_log.json"), "w") as fh:
            json.dump({"config": dataclasses.asdict(c), **result}, fh, indent=2)
        return result
