"""``DistillationTrainer``: a ``transformers.Trainer`` that distils extractive-QA students.

    trainer = DistillationTrainer(
        model=student, args=TrainingArguments(...), train_dataset=windows_with_cache,
        teacher=teacher,                                  # None: fine-tune on hard labels only
        distill=DistillConfig(temperature=2.0, alpha=0.5, layer_losses={"hidden": 1.0}),
        data_collator=DistillCollator(tokenizer), processing_class=tokenizer,
        eval_examples=dev_questions)                      # evaluate() gives SQuAD EM / F1
    trainer.train(resume_from_checkpoint=...)

Loss = ``qa_kd_loss`` (soft: ``alpha * T^2 * KL``, hard: ``(1 - alpha) * CE``; start
and end heads averaged) over the span tokens only (CLS + the window's context,
:func:`kdfast.distill.collate.span_mask`), plus the optional ``LayerKD`` terms
(hidden MSE / cosine, attention-score MSE, attention KL, value relation) from
``kdfast.hf.capture`` (no ``output_attentions`` maps), plus the Lagrangian
sparsity penalty while pruning. Teacher logits come from the batch when the
windows carry the teacher cache, else from a live teacher forward (always live
for layer terms, which need the teacher's activations).

The teacher is frozen, in eval mode, on the training device, and is not part of
the student's checkpoints; LayerKD projections are saved next to each
checkpoint (``kdfast_layer_kd.pt``) so ``resume_from_checkpoint`` restores them.
"""
from __future__ import annotations

import dataclasses
import os

import torch
from transformers import Trainer, TrainerCallback

from kdfast.distill.collate import span_mask
from kdfast.ops.qa_kd_loss import qa_kd_loss

KDFAST_COLUMNS = ("start_positions", "end_positions", "cls_index", "context_start", "context_end", "length",
                  "teacher_start", "teacher_end", "teacher_start_idx", "teacher_end_idx")
_BATCH_ONLY = ("cls_index", "context_start", "context_end", "teacher_start_logits", "teacher_end_logits",
               "start_positions", "end_positions")
_LAYER_KD_FILE = "kdfast_layer_kd.pt"


LOGIT_LOSSES = ("kl", "reverse_kl", "jsd", "mse")
TERM_WEIGHTINGS = ("fixed", "ema")


@dataclasses.dataclass
class DistillConfig:
    """What the student learns from.

    temperature: softmax temperature of the soft term (T^2-scaled, Hinton).
    alpha: weight of the soft term; the hard (gold span) term gets ``1 - alpha``.
    layer_losses: ``{term: weight}`` for :class:`kdfast.nn.LayerKD` (None: logits only).
    layer_mapping: LayerKD mapping of every layer term (``"mean"``, the default, ``"uniform"``, ``"skip"``,
        ``"first_k"``, ``"last_k"``, ``"random"``, ``"learned"`` or a list; :mod:`kdfast.nn.layer_mapping`).
    attention_mapping, hidden_mapping: the mapping of the attention / hidden terms (None: ``layer_mapping``).
    mapping_k: k of ``first_k`` / ``last_k``; mapping_seed: seed of ``random`` (resampled each epoch).
    mapping_learning_rate: learning rate of the ``learned`` mapping's logits (no weight decay).
    logit_loss: the soft term over the span tokens (CLS + context), start and end heads averaged,
        per question (batch mean): ``"kl"`` KL(teacher || student) T^2 (the fused ``qa_kd_loss``),
        ``"reverse_kl"`` KL(student || teacher) T^2, ``"jsd"`` Jensen-Shannon divergence T^2
        (0.5 KL(p_s || m) + 0.5 KL(p_t || m), m the average), ``"mse"`` mean squared difference of the
        raw logits over the span tokens (temperature unused).
    layer_weight_schedule: ``"constant"`` (every term every step) or ``"two_stage:F"`` (TinyBERT's two
        stages in one run: the first ``F`` of the training steps optimise the layer terms only, the rest
        the prediction term (soft + hard) only).
    term_weighting: ``"fixed"`` (the weights as given) or ``"ema"`` / ``"ema:<decay>"``: each term (the
        prediction term and each layer term) is divided by a running, bias-corrected exponential
        average of its own detached value (decay 0.9 by default) before its weight is applied, so every
        term contributes about ``weight`` whatever its scale (the averages are not checkpointed).
    """
    temperature: float = 2.0
    alpha: float = 0.5
    layer_losses: dict | None = None
    layer_mapping: object = "mean"
    attention_mapping: object = None
    hidden_mapping: object = None
    mapping_k: int | None = None
    mapping_seed: int = 0
    mapping_learning_rate: float = 0.05
    logit_loss: str = "kl"
    layer_weight_schedule: str = "constant"
    term_weighting: str = "fixed"

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.logit_loss not in LOGIT_LOSSES:
            raise ValueError(f"logit_loss must be one of {', '.join(LOGIT_LOSSES)}, got {self.logit_loss!r}")
        self.two_stage_fraction()
        self.ema_decay()

    def two_stage_fraction(self) -> float | None:
        """F of ``"two_stage:F"`` (None for ``"constant"``)."""
        spec = str(self.layer_weight_schedule)
        if spec == "constant":
            return None
        name, _, frac = spec.partition(":")
        try:
            f = float(frac) if name == "two_stage" else None
        except ValueError:
            f = None
        if f is None or not 0.0 <= f <= 1.0:
            raise ValueError(f"layer_weight_schedule must be 'constant' or 'two_stage:F' with F in [0, 1], "
                             f"got {spec!r}")
        return f

    def ema_decay(self) -> float | None:
        """The decay of ``"ema"`` / ``"ema:<decay>"`` term weighting (None for ``"fixed"``)."""
        spec = str(self.term_weighting)
        if spec == "fixed":
            return None
        name, _, d = spec.partition(":")
        try:
            decay = (float(d) if d else 0.9) if name == "ema" else None
        except ValueError:
            decay = None
        if decay is None or not 0.0 <= decay < 1.0:
            raise ValueError(f"term_weighting must be 'fixed', 'ema' or 'ema:<decay in [0, 1)>', got {spec!r}")
        return decay


def logit_kd_loss(student_start, student_end, teacher_start, teacher_end, mask, *, kind="reverse_kl",
                  temperature=2.0):
    """The soft term of the non-default ``logit_loss`` choices (plain PyTorch, float32 or float64).

    student_*, teacher_*: ``[B, L]`` logits; mask: ``[B, L]`` bool (the span tokens). Start and end
    heads averaged, summed over tokens, mean over the B rows (as ``qa_kd_loss``'s ``batchmean``).
    """
    keep = mask.bool()
    T = float(temperature)

    def head(s, t):
        acc = torch.promote_types(s.dtype, torch.float32)
        s, t = s.to(acc), t.to(acc)
        if kind == "mse":
            return ((s - t) ** 2 * keep).sum() / keep.sum().clamp(min=1)
        ls = torch.log_softmax((s / T).masked_fill(~keep, float("-inf")), -1)
        lt = torch.log_softmax((t / T).masked_fill(~keep, float("-inf")), -1)
        ps, pt = ls.exp(), lt.exp()
        # masked tokens: p = 0 and log p = -inf; zero the logs there so no -inf - -inf (NaN) reaches
        # the gradient of the untaken branch
        ls, lt = ls.masked_fill(~keep, 0.0), lt.masked_fill(~keep, 0.0)

        def kl(p, logp, logq):  # sum p (log p - log q) over kept tokens
            return (p * (logp - logq)).masked_fill(~keep, 0.0).sum(-1)
        if kind == "reverse_kl":
            rows = kl(ps, ls, lt)
        elif kind == "jsd":
            lm = torch.log((0.5 * (ps + pt)).masked_fill(~keep, 1.0))
            rows = 0.5 * kl(ps, ls, lm) + 0.5 * kl(pt, lt, lm)
        elif kind == "kl":
            rows = kl(pt, lt, ls)
        else:
            raise ValueError(f"logit_kd_loss: kind must be one of {', '.join(LOGIT_LOSSES)}, got {kind!r}")
        return T * T * rows.mean()

    return 0.5 * (head(student_start, teacher_start) + head(student_end, teacher_end))


def parse_layer_losses(spec: str | None, flag: str = "--layer_losses") -> dict | None:
    """``"hidden:1,attention_kl:1"`` (or ``"hidden,attention_kl"``: weight 1) -> ``{term: weight}``;
    errors name ``flag``."""
    if spec is None or str(spec).strip() in ("", "none"):
        return None
    from kdfast.nn.layer_kd import TERMS
    out = {}
    for part in str(spec).split(","):
        name, _, w = part.strip().partition(":")
        if name not in TERMS:
            raise ValueError(f"{flag}: unknown term {name!r}; terms are {', '.join(TERMS)}")
        try:
            out[name] = float(w) if w else 1.0
        except ValueError:
            raise ValueError(f"{flag}: weight of {name!r} must be a number, got {w!r}") from None
    return out


class _LayerKDSync(TrainerCallback):
    """The LayerKD projections train outside the student (they are not saved with it), so Trainer's
    ``model.zero_grad()`` and DDP's gradient averaging do not reach them: average their gradients
    over processes before each optimizer step and clear them after it."""

    def __init__(self, layer_kd):
        self.layer_kd = layer_kd

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            n = dist.get_world_size()
            for p in self.layer_kd.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(n)

    def on_step_end(self, args, state, control, **kwargs):
        self.layer_kd.zero_grad(set_to_none=True)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.layer_kd.resample(int(round(state.epoch or 0)))  # "random" mappings: this epoch's layers


class DistillationTrainer(Trainer):
    """See the module docstring. Extra arguments besides ``Trainer``'s:

    teacher: frozen teacher (``None``: fine-tune mode, hard labels only).
    distill: :class:`DistillConfig`.
    pruning: ``(gates, controller)`` from ``kdfast.compress.add_gates`` and
        ``kdfast.nn.SparsityController`` (the controller is attached to the model as
        ``kdfast_sparsity`` so it is checkpointed with it); adds the sparsity penalty.
    gate_learning_rate: learning rate of the gates and Lagrange multipliers.
    eval_examples / eval_features: dev questions (and their windows) for SQuAD metrics.
    version_2_with_negative, n_best_size, max_answer_length: post-processing options.
    unpad: run the student (and the live teacher) on kdfast's unpadded encoder
        (:func:`kdfast.distill.models.unpad_if_supported`: BERT-family models on the kdfast
        attention; padded tokens cost no work). ``self.unpadded`` says whether the student does.
    """

    def __init__(self, *args, teacher=None, distill: DistillConfig | None = None, pruning=None,
                 gate_learning_rate: float = 0.05, eval_examples=None, eval_features=None,
                 version_2_with_negative: bool = False, n_best_size: int = 20, max_answer_length: int = 30,
                 unpad: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        from kdfast.distill.models import unpad_if_supported
        self.unpadded = unpad_if_supported(self.model) if unpad else False
        self.distill = distill or DistillConfig()
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            teacher.to(self.args.device)
            if unpad:
                unpad_if_supported(teacher)
        self.layer_kd = None
        if self.distill.layer_losses:
            if teacher is None:
                raise ValueError("layer losses need a teacher (--teacher_name_or_path)")
            from kdfast.nn import LayerKD
            d = self.distill
            self.layer_kd = LayerKD(self.model.config, teacher.config, mapping=d.layer_mapping,
                                    losses=d.layer_losses, attention_mapping=d.attention_mapping,
                                    hidden_mapping=d.hidden_mapping, k=d.mapping_k,
                                    seed=d.mapping_seed).to(self.args.device)
            self.add_callback(_LayerKDSync(self.layer_kd))
            for m, who in ((self.model, "student"), (teacher, "teacher")):
                impl = getattr(m.config, "_attn_implementation", None)
                if impl != "kdfast":
                    raise ValueError(f"layer losses read q/k/v through kdfast.hf.capture: the {who} must use "
                                     f"attn_implementation='kdfast' (it uses {impl!r})")
        self.pruning = pruning
        if pruning is not None:
            self.model.kdfast_sparsity = pruning[1]
        self.gate_learning_rate = gate_learning_rate
        self.eval_examples, self.eval_features = eval_examples, eval_features
        self.qa_options = dict(version_2_with_negative=version_2_with_negative, n_best_size=n_best_size,
                               max_answer_length=max_answer_length)
        # compute_loss returns a per-batch mean: Trainer must divide by the accumulation steps itself.
        self.model_accepts_loss_kwargs = False
        self._parts = {}
        self._ema = {}

    # --- data ---------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        # Stock Trainer drops every column the model's forward does not name (remove_unused_columns):
        # the teacher cache and the span bounds must survive to the collator.
        self._signature_columns = list(dict.fromkeys(list(self._signature_columns) + list(KDFAST_COLUMNS)))

    # --- optimisation ---------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        """Trainer's sampler (``train_sampling_strategy``; kdfast's defaults pick ``"random"`` for a student
        on the unpadded encoder, whose padded tokens cost nothing: length-grouped batches there only
        gather the windows of one passage, which cost F1, see :func:`kdfast.distill.stage.sampling_strategy`),
        with the length-grouping lengths read once as a list: ``datasets`` returns
        a lazy ``Column`` for ``ds["length"]``, and ``LengthGroupedSampler`` indexes it element by element
        (one table slice each; on a concatenated 25,000-window set that kept the first step waiting for
        more than 10 minutes)."""
        from transformers.trainer_pt_utils import LengthGroupedSampler
        ds = self.train_dataset if train_dataset is None else train_dataset
        col = self.args.length_column_name
        if (self.args.train_sampling_strategy != "group_by_length" or not hasattr(ds, "column_names")
                or col not in ds.column_names):
            return super()._get_train_sampler(train_dataset)
        lengths = [int(x) for x in ds.select_columns([col]).to_dict()[col]]
        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                    dataset=ds, lengths=lengths)

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = model if model is not None else self.model
        gate_ids = set()
        special = []
        for attr in ("kdfast_gates", "kdfast_sparsity"):
            mod = getattr(model, attr, None)
            if mod is not None:
                ps = [p for p in mod.parameters() if p.requires_grad]
                gate_ids |= {id(p) for p in ps}
                special += ps
        decay_names = set(self.get_decay_parameter_names(model))
        decay, no_decay = [], []
        for n, p in model.named_parameters():
            if not p.requires_grad or id(p) in gate_ids:
                continue
            (decay if n in decay_names else no_decay).append(p)
        mapping_logits = []
        if self.layer_kd is not None:
            for n, p in self.layer_kd.named_parameters():
                (mapping_logits if n.endswith("_map.logits") else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.args.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        if mapping_logits:
            groups.append({"params": mapping_logits, "weight_decay": 0.0, "lr": self.distill.mapping_learning_rate})
        if special:
            groups.append({"params": special, "weight_decay": 0.0, "lr": self.gate_learning_rate})
        opt_cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = opt_cls([g for g in groups if g["params"]], **opt_kwargs)
        return self.optimizer

    # --- loss -------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        extra = {k: inputs.pop(k) for k in _BATCH_ONLY if k in inputs}
        ids = inputs["input_ids"]
        L = ids.shape[1]
        mask = span_mask({**inputs, **extra}, L)
        want_layers = self.layer_kd is not None
        if want_layers:
            from kdfast.hf.capture import capture
            base = self.accelerator.unwrap_model(model)
            with capture(base) as cs, capture(self.teacher, **self.layer_kd.capture_args("teacher")) as ct:
                out = model(**inputs, output_hidden_states=True)
                with torch.no_grad():
                    t_out = self.teacher(**inputs, output_hidden_states=True)
            layer_total, terms = self.layer_kd(out.hidden_states, cs.layers, t_out.hidden_states, ct.layers,
                                               inputs.get("attention_mask"))
            t_start, t_end = t_out.start_logits, t_out.end_logits
        else:
            out = model(**inputs)
            layer_total, terms = None, {}
            if "teacher_start_logits" in extra:
                t_start, t_end = extra["teacher_start_logits"], extra["teacher_end_logits"]
            elif self.teacher is not None:
                with torch.no_grad():
                    t_out = self.teacher(**inputs)
                t_start, t_end = t_out.start_logits, t_out.end_logits
            else:
                t_start = t_end = None
        s_start, s_end = out.start_logits, out.end_logits
        sp, ep = extra.get("start_positions"), extra.get("end_positions")
        if t_start is None:  # fine-tune: hard labels only, over the same span tokens
            loss = qa_kd_loss(s_start, s_end, s_start.detach(), s_end.detach(), sp, ep, soft_weight=0.0,
                              hard_weight=1.0, mask=mask)
        elif self.distill.logit_loss == "kl":
            a = self.distill.alpha
            loss = qa_kd_loss(s_start, s_end, t_start.to(s_start.device), t_end.to(s_end.device), sp, ep,
                              temperature=self.distill.temperature, soft_weight=a, hard_weight=1.0 - a,
                              mask=mask)
        else:
            a = self.distill.alpha
            loss = a * logit_kd_loss(s_start, s_end, t_start.to(s_start.device), t_end.to(s_end.device), mask,
                                     kind=self.distill.logit_loss, temperature=self.distill.temperature)
            if a < 1.0 and sp is not None:
                loss = loss + qa_kd_loss(s_start, s_end, s_start.detach(), s_end.detach(), sp, ep, soft_weight=0.0,
                                         hard_weight=1.0 - a, mask=mask)
        parts = {"span_loss": loss.detach()}
        if layer_total is not None:
            parts.update({f"layer_{k}": v.detach() for k, v in terms.items()})
            if self.distill.two_stage_fraction() is None and self.distill.ema_decay() is None:
                loss = loss + layer_total
            else:
                loss = self._combine(loss, terms)
        elif self.distill.ema_decay() is not None:
            loss = self._normalised("span", loss)
        if self.pruning is not None:
            gates, ctl = self.pruning
            exp_sparsity = gates.expected_sparsity()
            loss = loss + ctl.penalty(exp_sparsity, self.state.global_step)
            parts["expected_sparsity"] = exp_sparsity.detach()
            parts["target_sparsity"] = torch.tensor(ctl.target_at(self.state.global_step))
        for k, v in parts.items():
            s, n = self._parts.get(k, (0.0, 0))
            self._parts[k] = (s + float(v), n + 1)
        return (loss, out) if return_outputs else loss

    def _normalised(self, name, value):
        """``value`` over the bias-corrected EMA of its detached magnitude (``term_weighting="ema"``)."""
        decay = self.distill.ema_decay()
        if decay is None:
            return value
        avg, n = self._ema.get(name, (0.0, 0))
        avg, n = decay * avg + (1 - decay) * abs(float(value.detach())), n + 1
        self._ema[name] = (avg, n)
        return value / max(avg / (1 - decay ** n), 1e-12)

    def _combine(self, span_loss, terms):
        """Prediction term + weighted layer terms under ``layer_weight_schedule`` and ``term_weighting``."""
        frac = self.distill.two_stage_fraction()
        span_on = layers_on = 1.0
        if frac is not None:
            max_steps = max(int(getattr(self.state, "max_steps", 0) or 0), 1)
            first = self.state.global_step < frac * max_steps
            span_on, layers_on = (0.0, 1.0) if first else (1.0, 0.0)
        total = span_on * self._normalised("span", span_loss)
        for k, v in terms.items():
            total = total + layers_on * self.layer_kd.losses[k] * self._normalised(k, v)
        return total

    def log(self, logs, *args, **kwargs):
        if self._parts and "loss" in logs:
            keys = sorted(self._parts)
            sums = torch.tensor([[self._parts[k][0], self._parts[k][1]] for k in keys], dtype=torch.float64,
                                device=self.args.device)
            if self.args.world_size > 1:  # every rank logs "loss" at the same step: the reduction is safe
                sums = self.accelerator.reduce(sums, reduction="sum")
            logs.update({k: round(float(a / max(b, 1)), 6) for k, (a, b) in zip(keys, sums.tolist())})
            self._parts = {}
        return super().log(logs, *args, **kwargs)

    # --- checkpoints ------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial, *args, **kwargs):
        super()._save_checkpoint(model, trial, *args, **kwargs)
        if self.layer_kd is not None and self.args.should_save:
            ckpt = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
            if os.path.isdir(ckpt):
                torch.save(self.layer_kd.state_dict(), os.path.join(ckpt, _LAYER_KD_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, _LAYER_KD_FILE)
        if self.layer_kd is not None and os.path.exists(path):
            self.layer_kd.load_state_dict(torch.load(path, map_location=self.args.device, weights_only=True))

    # --- evaluation ---------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """SQuAD EM / F1 on ``eval_examples`` (n-best post-processing), or Trainer's loss evaluation
        when no questions were given."""
        if self.eval_examples is None:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        from kdfast.qa.evaluate import evaluate_qa
        model = self.accelerator.unwrap_model(self.model)
        res = evaluate_qa(model, self.processing_class, self.eval_examples, features=self.eval_features,
                          batch_size=self.args.per_device_eval_batch_size, progress=not self.args.disable_tqdm,
                          **self.qa_options)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in res.metrics.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
