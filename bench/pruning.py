"""Pruning benchmarks: BERT QA forward (dense sdpa / kdfast attention / compacted)
and the attention op alone vs SDPA with padding and block sparsity.

    python bench/pruning.py            # default: 4 layers, 3 reps (< 3 min on 2 cores)
    python bench/pruning.py --full     # 12 layers (BERT-base), 5 reps

Targets (issue 6): compacted (50% heads, 60% FFN pruned) >= 1.8x faster than
dense at B=8; kdfast attention >= 1.2x SDPA on padded batches; the op's time
falls in proportion to the blocks kept (>= 1.7x at 50% sparsity).

Everything is random-init from a BertConfig (no downloads). Padding follows a
SQuAD-like length mix at max_length=384: a quarter of the windows full
(long contexts split with a stride), the rest 120-300 tokens.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import Bench  # noqa: E402

import kdfast  # noqa: E402
import kdfast.hf  # noqa: E402
import kdfast.compress as kc  # noqa: E402
from kdfast.ops import attention  # noqa: E402


def squad_lengths(B, L, seed=0):
    if B == 1:
        return [217]  # a typical single SQuAD window: question + short context, padded to 384
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(B):
        if torch.rand((), generator=g) < 0.25:
            out.append(L)
        else:
            out.append(int(torch.randint(120, 301, (), generator=g)))
    return out


def padded_batch(B, L, seed=0):
    lengths = squad_lengths(B, L, seed)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(1000, 30000, (B, L), generator=g)
    am = torch.zeros(B, L, dtype=torch.long)
    for b, n in enumerate(lengths):
        am[b, :n] = 1
    ids[am == 0] = 0
    return ids, am, lengths


def bert_base(layers, impl):
    from transformers import AutoModelForQuestionAnswering, BertConfig
    cfg = BertConfig(num_hidden_layers=layers)  # BERT-base sizes: 768 hidden, 12 heads, 3072 FFN
    torch.manual_seed(0)
    return AutoModelForQuestionAnswering.from_config(cfg, attn_implementation=impl).eval()


def pruning_masks(layers, H=12, F=3072, head_frac=0.5, ffn_frac=0.6, seed=0):
    """50% of heads and 60% of FFN units pruned, unevenly spread over layers."""
    g = torch.Generator().manual_seed(seed)
    total_heads = layers * H
    keep_heads = torch.zeros(total_heads, dtype=torch.bool)
    keep_heads[torch.randperm(total_heads, generator=g)[: int(round(total_heads * (1 - head_frac)))]] = True
    heads = list(keep_heads.view(layers, H))
    ffn = []
    for _ in range(layers):
        m = torch.zeros(F, dtype=torch.bool)
        m[torch.randperm(F, generator=g)[: int(round(F * (1 - ffn_frac)))]] = True
        ffn.append(m)
    return heads, ffn


def bench_model(b: Bench, layers, reps, summary):
    dense = bert_base(layers, "sdpa")
    fast = bert_base(layers, "kdfast")
    compacted = bert_base(layers, "kdfast")
    heads, ffn = pruning_masks(layers)
    kc.compact(compacted, heads=heads, ffn=ffn)
    for B in (1, 8):
        ids, am, lengths = padded_batch(B, 384, seed=B)
        cfg = f"L=384 layers={layers} valid={sum(lengths) / (B * 384):.0%}"

        def fwd(m):
            def f():
                with torch.inference_mode():
                    m(input_ids=ids, attention_mask=am)
            return f

        def fwd_zpq(m):
            def f():
                prev = kdfast.hf.set_options(zero_padded_queries=True)
                try:
                    with torch.inference_mode():
                        m(input_ids=ids, attention_mask=am)
                finally:
                    kdfast.hf.set_options(**prev)
            return f

        res = {}
        for name, fn in (("sdpa", fwd(dense)), ("kdfast", fwd(fast)), ("kdfast-zero-pad-q", fwd_zpq(fast)),
                         ("compacted-kdfast", fwd(compacted))):
            r = b.run("bert_qa_forward", name, fn, mode="fwd", x_name="B", x_value=B, config=cfg, warmup=1,
                      reps=reps)
            res[name] = r["p50"] if r else float("nan")
        summary.append(f"BERT QA fwd B={B} ({cfg}): sdpa {res['sdpa'] * 1e3:.0f} ms, kdfast attention "
                       f"{res['kdfast'] * 1e3:.0f} ms ({res['sdpa'] / res['kdfast']:.2f}x), +zero padded queries "
                       f"{res['kdfast-zero-pad-q'] * 1e3:.0f} ms ({res['sdpa'] / res['kdfast-zero-pad-q']:.2f}x), "
                       f"compacted {res['compacted-kdfast'] * 1e3:.0f} ms "
                       f"({res['sdpa'] / res['compacted-kdfast']:.2f}x; target >= 1.8x at B=8)")


def block_mask(H, nb, keep_frac, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = nb * nb
    k = max(1, int(round(n * keep_frac)))
    m = torch.zeros(H, n, dtype=torch.bool)
    for h in range(H):
        m[h, torch.randperm(n, generator=g)[:k]] = True
    return m.view(1, H, nb, nb)


def bench_op(b: Bench, B, reps, summary):
    import torch.nn.functional as F
    H, L, D, bs = 12, 384, 64, 64
    g = torch.Generator().manual_seed(0)
    q, k, v = [torch.randn(B, L, H, D, generator=g).transpose(1, 2) for _ in range(3)]
    ids, am, lengths = padded_batch(B, L, seed=3)
    mask = am.bool()
    # Padding: SDPA with the boolean padding mask vs kdfast skipping padded keys.
    cfg = f"B={B} H={H} L={L} D={D} valid={sum(lengths) / (B * L):.0%}"
    r_s = b.run("attention_padded", "sdpa", lambda: F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask[:, None, None, :]), mode="fwd", config=cfg, warmup=1, reps=reps)
    r_k = b.run("attention_padded", "kdfast", lambda: attention(q, k, v, mask=mask), mode="fwd", config=cfg,
                warmup=1, reps=reps)
    r_z = b.run("attention_padded", "kdfast-zero-pad-q", lambda: attention(
        q, k, v, mask=mask, zero_padded_queries=True), mode="fwd", config=cfg, warmup=1, reps=reps)
    summary.append(f"attention op, padded ({cfg}): sdpa {r_s['p50'] * 1e3:.1f} ms, kdfast {r_k['p50'] * 1e3:.1f} ms "
                   f"({r_s['p50'] / r_k['p50']:.2f}x; target >= 1.2x), zero padded queries "
                   f"{r_z['p50'] * 1e3:.1f} ms ({r_s['p50'] / r_z['p50']:.2f}x)")
    # Block sparsity.
    cfg0 = f"B={B} H={H} L={L} D={D} block={bs}"
    r_dense = b.run("attention_blocks", "sdpa", lambda: F.scaled_dot_product_attention(q, k, v), mode="fwd",
                    x_name="sparsity", x_value=0, config=cfg0, warmup=1, reps=reps)
    base = None
    for sp in (0.0, 0.5, 0.75):
        bm = block_mask(H, L // bs, 1 - sp)
        dense_mask = bm.repeat_interleave(bs, -2).repeat_interleave(bs, -1)
        r_sm = b.run("attention_blocks", "sdpa-dense-mask", lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=dense_mask), mode="fwd", x_name="sparsity", x_value=sp, config=cfg0, warmup=1,
            reps=reps)
        r = b.run("attention_blocks", "kdfast", lambda: attention(q, k, v, block_mask=bm, block_size=bs),
                  mode="fwd", x_name="sparsity", x_value=sp, config=cfg0, warmup=1, reps=reps)
        base = base or r["p50"]
        summary.append(f"attention op, {sp:.0%} block sparsity ({cfg0}): kdfast {r['p50'] * 1e3:.1f} ms "
                       f"({base / r['p50']:.2f}x vs kdfast dense, ideal {1 / (1 - sp):.1f}x; target >= 1.7x at 50%), "
                       f"sdpa dense {r_dense['p50'] * 1e3:.1f} ms ({r_dense['p50'] / r['p50']:.2f}x), "
                       f"sdpa with the block mask {r_sm['p50'] * 1e3:.1f} ms ({r_sm['p50'] / r['p50']:.2f}x)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="12 layers (BERT-base) and 5 reps")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--skip-op", action="store_true")
    args = ap.parse_args()
    layers, reps = (12, 5) if args.full else (4, 3)
    b = Bench("pruning")
    summary = []
    print(f"kdfast {kdfast.__version__}; attention backend on CPU: "
          f"{kdfast.plan('attention', 'cpu').backend}; threads {torch.get_num_threads()}")
    if not args.skip_op:
        for B in (1, 8):
            bench_op(b, B, reps + 2, summary)
    if not args.skip_model:
        bench_model(b, layers, reps, summary)
    b.table()
    print(f"\nSummary ({b.dev_name}; ratios are baseline time / kdfast time):")
    for line in summary:
        print(" -", line)


if __name__ == "__main__":
    main()
