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


@dataclasses.dataclass
class DistillConfig:
    """What the student learns from.

    temperature: softmax temperature of the soft term (T^2-scaled, Hinton).
    alpha: weight of the soft term; the hard (gold span) term gets ``1 - alpha``.
    layer_losses: ``{term: weight}`` for :class:`kdfast.nn.LayerKD` (None: logits only).
    layer_mapping: LayerKD mapping (``"uniform"``, ``"last_k"``, ``"skip"`` or a list of pairs).
    """
    temperature: float = 2.0
    alpha: float = 0.5
    layer_losses: dict | None = None
    layer_mapping: object = "uniform"

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"--alpha must be in [0, 1], got {self.alpha}")


def parse_layer_losses(spec: str | None) -> dict | None:
    """``"hidden:1,attention_kl:1"`` (or ``"hidden,attention_kl"``: weight 1) -> ``{term: weight}``."""
    if spec is None or str(spec).strip() in ("", "none"):
        return None
    from kdfast.nn.layer_kd import TERMS
    out = {}
    for part in str(spec).split(","):
        name, _, w = part.strip().partition(":")
        if name not in TERMS:
            raise ValueError(f"--layer_losses: unknown term {name!r}; terms are {', '.join(TERMS)}")
        try:
            out[name] = float(w) if w else 1.0
        except ValueError:
            raise ValueError(f"--layer_losses: weight of {name!r} must be a number, got {w!r}") from None
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
    """

    def __init__(self, *args, teacher=None, distill: DistillConfig | None = None, pruning=None,
                 gate_learning_rate: float = 0.05, eval_examples=None, eval_features=None,
                 version_2_with_negative: bool = False, n_best_size: int = 20, max_answer_length: int = 30,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.distill = distill or DistillConfig()
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            teacher.to(self.args.device)
        self.layer_kd = None
        if self.distill.layer_losses:
            if teacher is None:
                raise ValueError("layer losses need a teacher (--teacher_name_or_path)")
            from kdfast.nn import LayerKD
            self.layer_kd = LayerKD(self.model.config, teacher.config, mapping=self.distill.layer_mapping,
                                    losses=self.distill.layer_losses).to(self.args.device)
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

    # --- data ---------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        # Stock Trainer drops every column the model's forward does not name (remove_unused_columns):
        # the teacher cache and the span bounds must survive to the collator.
        self._signature_columns = list(dict.fromkeys(list(self._signature_columns) + list(KDFAST_COLUMNS)))

    # --- optimisation ---------------------------------------------------------------------
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
        if self.layer_kd is not None:
            decay += list(self.layer_kd.parameters())
        groups = [{"params": decay, "weight_decay": self.args.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
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
            layer_total, terms = self.layer_kd(out.hidden_states, t_out.hidden_states, cs.layers, ct.layers,
                                               attention_mask=inputs.get("attention_mask"))
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
                              hard_weight=1.0, attention_mask=mask)
        else:
            a = self.distill.alpha
            loss = qa_kd_loss(s_start, s_end, t_start.to(s_start.device), t_end.to(s_end.device), sp, ep,
                              temperature=self.distill.temperature, soft_weight=a, hard_weight=1.0 - a,
                              attention_mask=mask)
        parts = {"span_loss": loss.detach()}
        if layer_total is not None:
            loss = loss + layer_total
            parts.update({f"layer_{k}": v.detach() for k, v in terms.items()})
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
