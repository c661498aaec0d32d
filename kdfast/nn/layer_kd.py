"""Layer-wise distillation (TinyBERT, MiniLM) as one module.

    layer_kd = LayerKD(student.config, teacher.config, mapping="uniform",
                       losses={"embedding": 1.0, "hidden": 1.0, "attention_score": 1.0})
    with kdfast.hf.capture(student) as cs, kdfast.hf.capture(teacher, **layer_kd.capture_args("teacher")) as ct:
        s_out = student(**batch, output_hidden_states=True)
        with torch.no_grad():
            t_out = teacher(**batch, output_hidden_states=True)
    total, terms = layer_kd(s_out.hidden_states, cs.layers, t_out.hidden_states, ct.layers,
                            batch["attention_mask"])

Layers are numbered from 1 (hidden_states[m] is the output of layer m and
hidden_states[0] the embeddings, as in HuggingFace); q/k/v lists are indexed
from 0 (qkv[m - 1] belongs to layer m).
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import nn

from kdfast.ops.attention_kl import attention_kl
from kdfast.ops.attention_score_mse import attention_score_mse
from kdfast.nn.layer_mapping import MAPPINGS, LayerMapping, layer_mapping  # noqa: F401 (re-exported)
from kdfast.ops.hidden_mse import hidden_cosine, hidden_cosine_reference, hidden_mse, hidden_mse_reference
from kdfast.ops.renamed_arguments import renamed_keywords

TERMS = ("embedding", "hidden", "hidden_cosine", "attention_score", "attention_kl", "value_relation")
_DEFAULT_LOSSES = {"embedding": 1.0, "hidden": 1.0, "attention_score": 1.0}


def _holds_hidden_states(seq):
    """A non-empty sequence of tensors (hidden states), not of per-layer (q, k, v) tuples."""
    return seq is not None and len(seq) > 0 and all(isinstance(x, torch.Tensor) for x in seq)


def _holds_qkv(seq):
    return seq is not None and any(isinstance(x, (tuple, list)) for x in seq)


def _cfg(config, name):
    if isinstance(config, Mapping):
        if name not in config:
            raise ValueError(f"LayerKD: config is missing {name!r}")
        return config[name]
    if not hasattr(config, name):
        raise ValueError(f"LayerKD: config {type(config).__name__} has no attribute {name!r}")
    return getattr(config, name)


class LayerKD(nn.Module):
    """Weighted sum of layer distillation terms; returns ``(total, {term: value})``.

    Args:
        student_config, teacher_config: HF configs (or dicts) with ``num_hidden_layers`` and
            ``hidden_size``.
        mapping: one of ``kdfast.nn.layer_mapping.MAPPINGS`` (``"uniform"``, ``"skip"``,
            ``"first_k"``, ``"last_k"``, ``"random"``, ``"mean"``, ``"learned"``) or an explicit list
            (see :mod:`kdfast.nn.layer_mapping`). Default ``"mean"``: each student layer matches the
            mean of its block of teacher layers, the best mapping of the design study
            (bench/results/kd_study.md: ~6.5 F1 above ``"uniform"``, TinyBERT's, for students taken
            from teacher layers; ``mapping="uniform"`` gives TinyBERT's pairs).
        attention_mapping, hidden_mapping: the mapping of the attention terms (attention_score,
            attention_kl, value_relation) and of the hidden terms (hidden, hidden_cosine); None: ``mapping``.
        losses: term -> weight. Terms: ``"embedding"`` (hidden MSE of layer 0 -> 0),
            ``"hidden"`` (hidden MSE of mapped layer outputs), ``"hidden_cosine"``,
            ``"attention_score"`` (TinyBERT score MSE), ``"attention_kl"`` (MiniLM attention
            KL), ``"value_relation"`` (MiniLM value KL). Default: TinyBERT (embedding, hidden,
            attention_score, weight 1). Each term is summed over the mapped student layers.
        k, stride: parameters of ``"first_k"`` / ``"last_k"`` and ``"skip"``.
        seed: seed of a ``"random"`` mapping (call :meth:`resample` at each epoch start).
        projection: learnable ``nn.Linear(D_s, D_t)`` projections when hidden sizes differ
            (``"shared"``: one for all layers and one for the embeddings, as TinyBERT;
            ``"per_layer"``: one per mapped student layer). Unused when sizes are equal.

    forward(student_hidden_states, student_qkv, teacher_hidden_states, teacher_qkv, mask):
        the student's inputs, then the teacher's, then the mask (kdfast/ops/__init__.py).
        hidden_states: sequences of ``[B, L, D]`` (HF ``output_hidden_states``), M+1 / N+1 entries.
        qkv: sequences of per-layer ``(q, k, v)`` ``[B, H, L, D_head]`` (``kdfast.hf.capture``).
        mask: ``[B, L]`` bool/integer/float, nonzero = keep (the HF ``attention_mask``).
        Only the inputs the chosen terms need are required. Deprecated for one release: the old
        order ``(student_hidden_states, teacher_hidden_states, student_qkv, teacher_qkv)`` (told
        apart by what the sequences hold) and ``attention_mask=``.
    """

    def __init__(self, student_config, teacher_config, mapping="mean", losses=None, *, k=None, stride=None,
                 projection="shared", attention_mapping=None, hidden_mapping=None, seed: int = 0):
        super().__init__()
        self.num_student = int(_cfg(student_config, "num_hidden_layers"))
        self.num_teacher = int(_cfg(teacher_config, "num_hidden_layers"))
        self.d_student = int(_cfg(student_config, "hidden_size"))
        self.d_teacher = int(_cfg(teacher_config, "hidden_size"))
        losses = dict(_DEFAULT_LOSSES if losses is None else losses)
        for name, w in losses.items():
            if name not in TERMS:
                raise ValueError(f"LayerKD: unknown loss term {name!r}; expected some of {', '.join(TERMS)}")
            if not isinstance(w, (int, float)) or w < 0:
                raise ValueError(f"LayerKD: weight of {name!r} must be a number >= 0, got {w!r}")
        if projection not in ("shared", "per_layer"):
            raise ValueError(f"LayerKD: projection must be 'shared' or 'per_layer', got {projection!r}")
        self.losses = {n: float(w) for n, w in losses.items()}
        M, N = self.num_student, self.num_teacher
        self.hidden_map = LayerMapping(M, N, mapping if hidden_mapping is None else hidden_mapping, k=k,
                                       stride=stride, seed=seed)
        self.attention_map = LayerMapping(M, N, mapping if attention_mapping is None else attention_mapping, k=k,
                                          stride=stride, seed=seed)
        self.projection = projection
        need = self.d_student != self.d_teacher
        hidden_terms = {"hidden", "hidden_cosine"} & set(self.losses)
        self.embedding_proj = nn.Linear(self.d_student, self.d_teacher) if need and "embedding" in self.losses \
            else None
        if need and hidden_terms:
            n = 1 if projection == "shared" else len(self.hidden_map.groups())
            self.hidden_proj = nn.ModuleList(nn.Linear(self.d_student, self.d_teacher) for _ in range(n))
        else:
            self.hidden_proj = None

    @property
    def pairs(self):
        """(student, teacher) pairs of the hidden terms' mapping (see ``attention_map.pairs``)."""
        return self.hidden_map.pairs

    def resample(self, epoch: int) -> None:
        """Call at the start of each epoch: ``"random"`` mappings draw that epoch's layers."""
        self.hidden_map.resample(epoch)
        self.attention_map.resample(epoch)

    def learned_mapping_weights(self) -> dict:
        """``{"hidden": [M, N], "attention": [M, N]}`` softmax weights of the ``"learned"`` mappings
        (row m: student layer m over teacher layers 1..N), detached; only the learned ones."""
        out = {}
        for name, m in (("hidden", self.hidden_map), ("attention", self.attention_map)):
            w = m.weights()
            if w is not None:
                out[name] = w.detach().cpu()
        return out

    def _proj(self, i):
        if self.hidden_proj is None:
            return None, None
        p = self.hidden_proj[0 if self.projection == "shared" else i]
        return p.weight, p.bias

    @staticmethod
    def _need(x, what, term):
        if x is None:
            raise ValueError(f"LayerKD: term {term!r} needs {what}")
        return x

    @staticmethod
    def _layer(seq, i, what, count):
        if i >= len(seq):  # only the mapped layers must be there (a pruned layer without heads has no q/k/v)
            raise ValueError(f"LayerKD: {what} has {len(seq)} entries, the configuration needs entry {i} "
                             f"(of {count})")
        if seq[i] is None:
            raise ValueError(f"LayerKD: {what}[{i}] is None (a capture that did not keep this layer); capture with "
                             "layers= and keep= from LayerKD.capture_args")
        return seq[i]

    @staticmethod
    def _part(x, name, what, i):
        if x is None:
            raise ValueError(f"LayerKD: {what}[{i}] has no {name} (a capture without {name!r} in keep=); capture "
                             "with LayerKD.capture_args")
        return x

    def capture_args(self, side: str) -> dict:
        """``layers=`` and ``keep=`` for ``kdfast.hf.capture`` of the ``"student"`` or ``"teacher"``:
        the 0-based layers the attention mapping uses and the tensors the attention terms read (q and k
        for attention_score / attention_kl, v for value_relation). A ``"random"`` mapping changes its
        layers at :meth:`resample`: take these per step.

            with capture(teacher, **layer_kd.capture_args("teacher")) as ct: ...
        """
        if side not in ("student", "teacher"):
            raise ValueError(f"LayerKD.capture_args: side must be 'student' or 'teacher', got {side!r}")
        keep = ""
        if {"attention_score", "attention_kl"} & set(self.losses):
            keep += "qk"
        if "value_relation" in self.losses:
            keep += "v"
        pairs = self.attention_map.pairs
        layers = sorted({(s if side == "student" else t) - 1 for s, t in pairs})
        return {"layers": layers if keep else [], "keep": keep or "q"}

    @staticmethod
    def _mix(values, weights):
        """One student layer's term over its teacher layers: the value (one layer), the mean / the
        weighted sum (soft mappings)."""
        if weights is None:
            return values[0]
        total = 0
        for v, w in zip(values, weights):
            total = total + w * v
        return total

    @renamed_keywords(attention_mask="mask")
    def forward(self, student_hidden_states=None, student_qkv=None, teacher_hidden_states=None, teacher_qkv=None,
                mask=None):
        if _holds_hidden_states(student_qkv) or _holds_qkv(teacher_hidden_states):
            warnings.warn("LayerKD(...): the positional order is (student_hidden_states, student_qkv, "
                          "teacher_hidden_states, teacher_qkv, mask); the old order (hidden states of both, then "
                          "q/k/v of both) goes in the next release", DeprecationWarning, stacklevel=3)
            student_qkv, teacher_hidden_states = teacher_hidden_states, student_qkv
        terms: dict[str, torch.Tensor] = {}
        L_s, L_t = self.num_student, self.num_teacher
        if "embedding" in self.losses:
            hs = self._need(student_hidden_states, "student_hidden_states", "embedding")
            ht = self._need(teacher_hidden_states, "teacher_hidden_states", "embedding")
            p = self.embedding_proj
            terms["embedding"] = hidden_mse(hs[0], ht[0].detach(), None if p is None else p.weight,
                                            None if p is None else p.bias, mask)
        for name, fn, reference in (("hidden", hidden_mse, hidden_mse_reference),
                                    ("hidden_cosine", hidden_cosine, hidden_cosine_reference)):
            if name not in self.losses:
                continue
            hs = self._need(student_hidden_states, "student_hidden_states", name)
            ht = self._need(teacher_hidden_states, "teacher_hidden_states", name)
            total = 0
            for i, (s, ts, w) in enumerate(self.hidden_map.groups()):
                pw, pb = self._proj(i)
                h_s = self._layer(hs, s, "student_hidden_states", L_s + 1)
                targets = [self._layer(ht, t, "teacher_hidden_states", L_t + 1).detach() for t in ts]
                if w is None:
                    total = total + fn(h_s, targets[0], pw, pb, mask)
                elif isinstance(w, torch.Tensor):  # learned: the gradient must reach the mixing weights
                    target = self._mix(targets, w.to(targets[0].dtype))
                    total = total + reference(h_s, target, pw, pb, mask)
                else:  # mean of the block's hidden states (a constant target: the fused op)
                    total = total + fn(h_s, self._mix(targets, w), pw, pb, mask)
            terms[name] = total
        for name in ("attention_score", "attention_kl", "value_relation"):
            if name not in self.losses:
                continue
            qs = self._need(student_qkv, "student_qkv (per-layer (q, k, v), e.g. from kdfast.hf.capture)", name)
            qt = self._need(teacher_qkv, "teacher_qkv (per-layer (q, k, v), e.g. from kdfast.hf.capture)", name)
            total = 0
            for s, ts, w in self.attention_map.groups():
                per_teacher = [self._attention_term(name, qs, qt, s, t, mask) for t in ts]
                total = total + self._mix(per_teacher, w)
            terms[name] = total
        total = sum(self.losses[n] * v for n, v in terms.items())
        if not terms:
            total = torch.zeros((), dtype=torch.float32)
        return total, terms

    def _attention_term(self, name, qs, qt, s, t, mask):
        q_s, k_s, v_s = self._layer(qs, s - 1, "student_qkv", self.num_student)
        q_t, k_t, v_t = self._layer(qt, t - 1, "teacher_qkv", self.num_teacher)
        if name == "value_relation":
            v_s = self._part(v_s, "v", "student_qkv", s - 1)
            v_t = self._part(v_t, "v", "teacher_qkv", t - 1).detach()
            return attention_kl(v_s, v_s, v_t, v_t, mask)
        parts = [self._part(x, n, w, i) for x, n, w, i in ((q_s, "q", "student_qkv", s - 1),
                                                            (k_s, "k", "student_qkv", s - 1),
                                                            (q_t, "q", "teacher_qkv", t - 1),
                                                            (k_t, "k", "teacher_qkv", t - 1))]
        q_s, k_s, q_t, k_t = parts[0], parts[1], parts[2].detach(), parts[3].detach()
        fn = attention_score_mse if name == "attention_score" else attention_kl
        return fn(q_s, k_s, q_t, k_t, mask)

    def extra_repr(self):
        return (f"student_layers={self.num_student}, teacher_layers={self.num_teacher}, "
                f"hidden_pairs={self.hidden_map.pairs}, attention_pairs={self.attention_map.pairs}, "
                f"losses={self.losses}")
