"""Layer-wise distillation (TinyBERT, MiniLM) as one module.

    layer_kd = LayerKD(student.config, teacher.config, mapping="uniform",
                       losses={"embedding": 1.0, "hidden": 1.0, "attention_score": 1.0})
    with kdfast.hf.capture(student) as cs, kdfast.hf.capture(teacher, **layer_kd.capture_args("teacher")) as ct:
        s_out = student(**batch, output_hidden_states=True)
        with torch.no_grad():
            t_out = teacher(**batch, output_hidden_states=True)
    total, terms = layer_kd(s_out.hidden_states, t_out.hidden_states, cs.layers, ct.layers,
                            attention_mask=batch["attention_mask"])

Layers are numbered from 1 (hidden_states[m] is the output of layer m and
hidden_states[0] the embeddings, as in HuggingFace); q/k/v lists are indexed
from 0 (qkv[m - 1] belongs to layer m).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from kdfast.ops.attention_kl import attention_kl
from kdfast.ops.attention_score_mse import attention_score_mse
from kdfast.ops.hidden_mse import hidden_cosine, hidden_mse

TERMS = ("embedding", "hidden", "hidden_cosine", "attention_score", "attention_kl", "value_relation")
MAPPINGS = ("uniform", "last_k", "skip")
_DEFAULT_LOSSES = {"embedding": 1.0, "hidden": 1.0, "attention_score": 1.0}


def _cfg(config, name):
    if isinstance(config, Mapping):
        if name not in config:
            raise ValueError(f"LayerKD: config is missing {name!r}")
        return config[name]
    if not hasattr(config, name):
        raise ValueError(f"LayerKD: config {type(config).__name__} has no attribute {name!r}")
    return getattr(config, name)


def layer_mapping(num_student: int, num_teacher: int, mapping="uniform", *, k: int | None = None,
                  stride: int | None = None) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs, layers numbered from 1.

    - ``"uniform"``: m -> m * N // M (TinyBERT's g(m) = m N / M; the last layers meet).
    - ``"last_k"``: the last ``k`` student layers -> the last ``k`` teacher layers
      (m -> m + N - M; default k = M).
    - ``"skip"``: m -> m * stride (default stride = N // M), for m with m * stride <= N.
    - a list of M teacher layers (``None`` skips a student layer), or of (student, teacher) pairs.
    """
    M, N = int(num_student), int(num_teacher)
    if M < 1 or N < 1:
        raise ValueError(f"layer_mapping: layer counts must be >= 1, got student {M}, teacher {N}")
    if isinstance(mapping, str):
        if mapping == "uniform":
            return [(m, m * N // M) for m in range(1, M + 1) if m * N // M >= 1]
        if mapping == "last_k":
            k = M if k is None else int(k)
            if not 1 <= k <= min(M, N):
                raise ValueError(f"layer_mapping: k must be in [1, {min(M, N)}], got {k}")
            return [(m, m + N - M) for m in range(M - k + 1, M + 1)]
        if mapping == "skip":
            stride = max(1, N // M) if stride is None else int(stride)
            if stride < 1:
                raise ValueError(f"layer_mapping: stride must be >= 1, got {stride}")
            return [(m, m * stride) for m in range(1, M + 1) if m * stride <= N]
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


class LayerKD(nn.Module):
    """Weighted sum of layer distillation terms; returns ``(total, {term: value})``.

    Args:
        student_config, teacher_config: HF configs (or dicts) with ``num_hidden_layers`` and
            ``hidden_size``.
        mapping: ``"uniform"``, ``"last_k"``, ``"skip"`` or an explicit list (see :func:`layer_mapping`).
        losses: term -> weight. Terms: ``"embedding"`` (hidden MSE of layer 0 -> 0),
            ``"hidden"`` (hidden MSE of mapped layer outputs), ``"hidden_cosine"``,
            ``"attention_score"`` (TinyBERT score MSE), ``"attention_kl"`` (MiniLM attention
            KL), ``"value_relation"`` (MiniLM value KL). Default: TinyBERT (embedding, hidden,
            attention_score, weight 1). Each term is summed over the mapped layers.
        k, stride: parameters of ``"last_k"`` and ``"skip"``.
        projection: learnable ``nn.Linear(D_s, D_t)`` projections when hidden sizes differ
            (``"shared"``: one for all layers and one for the embeddings, as TinyBERT;
            ``"per_layer"``: one per mapped layer). Unused when sizes are equal.

    forward(student_hidden_states, teacher_hidden_states, student_qkv, teacher_qkv, attention_mask):
        hidden_states: sequences of ``[B, L, D]`` (HF ``output_hidden_states``), M+1 / N+1 entries.
        qkv: sequences of per-layer ``(q, k, v)`` ``[B, H, L, D_head]`` (``kdfast.hf.capture``).
        attention_mask: ``[B, L]``, 1 = keep.
        Only the inputs the chosen terms need are required.
    """

    def __init__(self, student_config, teacher_config, mapping="uniform", losses=None, *, k=None, stride=None,
                 projection="shared"):
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
        self.pairs = layer_mapping(self.num_student, self.num_teacher, mapping, k=k, stride=stride)
        self.projection = projection
        need = self.d_student != self.d_teacher
        hidden_terms = {"hidden", "hidden_cosine"} & set(self.losses)
        self.embedding_proj = nn.Linear(self.d_student, self.d_teacher) if need and "embedding" in self.losses \
            else None
        if need and hidden_terms:
            n = 1 if projection == "shared" else len(self.pairs)
            self.hidden_proj = nn.ModuleList(nn.Linear(self.d_student, self.d_teacher) for _ in range(n))
        else:
            self.hidden_proj = None

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
        if len(seq) < count:
            raise ValueError(f"LayerKD: {what} has {len(seq)} entries, the configuration needs {count}")
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
        the 0-based layers the mapping uses and the tensors the attention terms read (q and k for
        attention_score / attention_kl, v for value_relation).

            with capture(teacher, **layer_kd.capture_args("teacher")) as ct: ...
        """
        if side not in ("student", "teacher"):
            raise ValueError(f"LayerKD.capture_args: side must be 'student' or 'teacher', got {side!r}")
        keep = ""
        if {"attention_score", "attention_kl"} & set(self.losses):
            keep += "qk"
        if "value_relation" in self.losses:
            keep += "v"
        layers = sorted({(s if side == "student" else t) - 1 for s, t in self.pairs})
        return {"layers": layers if keep else [], "keep": keep or "q"}

    def forward(self, student_hidden_states=None, teacher_hidden_states=None, student_qkv=None, teacher_qkv=None,
                attention_mask=None):
        terms: dict[str, torch.Tensor] = {}
        mask = attention_mask
        L_s, L_t = self.num_student, self.num_teacher
        if "embedding" in self.losses:
            hs = self._need(student_hidden_states, "student_hidden_states", "embedding")
            ht = self._need(teacher_hidden_states, "teacher_hidden_states", "embedding")
            p = self.embedding_proj
            terms["embedding"] = hidden_mse(hs[0], ht[0].detach(), None if p is None else p.weight,
                                            None if p is None else p.bias, mask)
        for name, fn in (("hidden", hidden_mse), ("hidden_cosine", hidden_cosine)):
            if name not in self.losses:
                continue
            hs = self._need(student_hidden_states, "student_hidden_states", name)
            ht = self._need(teacher_hidden_states, "teacher_hidden_states", name)
            total = 0
            for i, (s, t) in enumerate(self.pairs):
                w, b = self._proj(i)
                total = total + fn(self._layer(hs, s, "student_hidden_states", L_s + 1),
                                   self._layer(ht, t, "teacher_hidden_states", L_t + 1).detach(), w, b, mask)
            terms[name] = total
        for name in ("attention_score", "attention_kl", "value_relation"):
            if name not in self.losses:
                continue
            qs = self._need(student_qkv, "student_qkv (per-layer (q, k, v), e.g. from kdfast.hf.capture)", name)
            qt = self._need(teacher_qkv, "teacher_qkv (per-layer (q, k, v), e.g. from kdfast.hf.capture)", name)
            total = 0
            for s, t in self.pairs:
                q_s, k_s, v_s = self._layer(qs, s - 1, "student_qkv", L_s)
                q_t, k_t, v_t = self._layer(qt, t - 1, "teacher_qkv", L_t)
                if name == "value_relation":
                    v_s = self._part(v_s, "v", "student_qkv", s - 1)
                    v_t = self._part(v_t, "v", "teacher_qkv", t - 1).detach()
                    total = total + attention_kl(v_s, v_s, v_t, v_t, mask)
                    continue
                parts = [self._part(x, n, w, i) for x, n, w, i in ((q_s, "q", "student_qkv", s - 1),
                                                                    (k_s, "k", "student_qkv", s - 1),
                                                                    (q_t, "q", "teacher_qkv", t - 1),
                                                                    (k_t, "k", "teacher_qkv", t - 1))]
                q_s, k_s, q_t, k_t = parts[0], parts[1], parts[2].detach(), parts[3].detach()
                fn = attention_score_mse if name == "attention_score" else attention_kl
                total = total + fn(q_s, k_s, q_t, k_t, mask)
            terms[name] = total
        total = sum(self.losses[n] * v for n, v in terms.items())
        if not terms:
            total = torch.zeros((), dtype=torch.float32)
        return total, terms

    def extra_repr(self):
        return (f"student_layers={self.num_student}, teacher_layers={self.num_teacher}, pairs={self.pairs}, "
                f"losses={self.losses}")
