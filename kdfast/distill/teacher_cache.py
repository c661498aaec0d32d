"""Teacher start/end logits computed once per training set and kept on disk.

    cache = TeacherCache.build(teacher, train_windows, tokenizer, "out/teacher_cache")
    train_windows = cache.attach(train_windows)     # adds teacher_start / teacher_end columns

Only the tokens the span distribution covers are stored: CLS first, then the
window's context tokens (``context_start..context_end``), so a 384-token window
with a 250-token context stores 251 values per head. With ``top_k`` only the k
largest of those are kept (with their positions) and the student matches the
renormalised top-k distribution.

The cache is a ``datasets`` directory (Arrow, memory-mapped) named by a key of
the teacher's weights and the windows' content (``windows_fingerprint``: the same
windows read from another copy of the data find the same cache), so epochs, later pipeline
stages and active-learning rounds reuse it; a different teacher or other
windows get another key. Rows are keyed by ``(example_id, window)`` and
checked against the windows when attached.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

CACHE_COLUMNS = ("teacher_start", "teacher_end")
TOPK_COLUMNS = ("teacher_start_idx", "teacher_end_idx")
_CHUNK = 4096  # windows per predict/write chunk: bounded memory for large pools


def teacher_fingerprint(teacher: torch.nn.Module) -> str:
    """sha256 over the teacher's parameters and buffers (dtype, shape, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(teacher.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


_KEY_COLUMNS = ("example_id", "window", "input_ids", "token_type_ids", "cls_index", "context_start", "context_end")


def windows_fingerprint(features) -> str:
    """sha256 over what the teacher sees and the rows are keyed by (ids, windows, tokens, spans), in order.

    Content, not ``datasets``' fingerprint: that one follows how the windows were made (the tokenizer's
    path among others), so the same windows made in a copied or moved run directory built the cache again."""
    import pyarrow as pa
    import pyarrow.compute as pc
    h = hashlib.sha256(str(len(features)).encode())
    cols = [c for c in _KEY_COLUMNS if c in features.column_names]
    for batch in features.select_columns(cols).with_format("arrow").iter(batch_size=_CHUNK):
        for name in cols:
            col = batch.column(name).combine_chunks()
            h.update(name.encode())
            if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                h.update(pc.list_value_length(col).to_numpy(zero_copy_only=False).tobytes())
                col = col.flatten()
            if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                h.update("\0".join(col.to_pylist()).encode())
            else:
                h.update(col.to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
    return h.hexdigest()[:16]


def _segment(row_s, row_e, cls, c0, c1):
    idx = np.concatenate([[cls], np.arange(c0, c1 + 1)])
    return row_s[idx], row_e[idx]


class TeacherCache:
    """Teacher logits of a set of training windows (see module doc)."""

    def __init__(self, path: str, dataset, meta: dict):
        self.path, self.dataset, self.meta = path, dataset, meta

    @staticmethod
    def key(teacher_fp: str, features, top_k: int | None) -> str:
        return hashlib.sha256(f"{teacher_fp}|{windows_fingerprint(features)}|{top_k}".encode()).hexdigest()[:20]

    @classmethod
    def build(cls, teacher, features, tokenizer, cache_dir: str, *, batch_size: int = 64, top_k: int | None = None,
              progress: bool = True, overwrite: bool = False) -> "TeacherCache":
        """Run ``teacher`` over ``features`` (training windows) once, or load the cache if it exists.

        A BERT-family teacher on the kdfast attention is switched to the unpadded encoder first (in
        place, as :class:`DistillationTrainer` runs a live teacher: padded tokens cost nothing)."""
        from datasets import Dataset, concatenate_datasets, load_from_disk
        from kdfast.distill.models import unpad_if_supported
        from kdfast.qa.evaluate import predict_logits
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        need = {"example_id", "window", "cls_index", "context_start", "context_end", "input_ids"}
        missing = need - set(features.column_names)
        if missing:
            raise ValueError(f"TeacherCache: windows lack columns {sorted(missing)} (make them with "
                             "kdfast.qa.train_features)")
        fp = teacher_fingerprint(teacher)
        path = os.path.join(cache_dir, f"teacher-{cls.key(fp, features, top_k)}")
        meta_path = os.path.join(path, "kdfast_teacher_cache.json")
        if os.path.exists(meta_path) and not overwrite:
            with open(meta_path) as fh:
                meta = json.load(fh)
            return cls(path, load_from_disk(path), meta)
        unpad_if_supported(teacher)
        parts = []
        n = len(features)
        for lo in range(0, n, _CHUNK):
            chunk = features.select(range(lo, min(n, lo + _CHUNK)))
            s, e = predict_logits(teacher, chunk, tokenizer, batch_size=batch_size, progress=progress,
                                  desc=f"teacher cache {lo // _CHUNK + 1}/{-(-n // _CHUNK)}")
            cols = {"example_id": chunk["example_id"], "window": chunk["window"], "teacher_start": [],
                    "teacher_end": []}
            if top_k:
                cols.update(teacher_start_idx=[], teacher_end_idx=[])
            for i, (cl, c0, c1) in enumerate(zip(chunk["cls_index"], chunk["context_start"], chunk["context_end"])):
                vs, ve = _segment(s[i], e[i], cl, c0, c1)
                if top_k and top_k < len(vs):
                    for v, key in ((vs, "start"), (ve, "end")):
                        keep = np.sort(np.argpartition(-v, top_k - 1)[:top_k])
                        cols[f"teacher_{key}"].append(v[keep].astype(np.float32))
                        cols[f"teacher_{key}_idx"].append(keep.astype(np.int32))
                else:
                    cols["teacher_start"].append(vs.astype(np.float32))
                    cols["teacher_end"].append(ve.astype(np.float32))
                    if top_k:
                        cols["teacher_start_idx"].append(np.arange(len(vs), dtype=np.int32))
                        cols["teacher_end_idx"].append(np.arange(len(ve), dtype=np.int32))
            parts.append(Dataset.from_dict(cols))
        ds = concatenate_datasets(parts) if parts else Dataset.from_dict({c: [] for c in ("example_id", "window")})
        tmp = path + ".tmp"
        ds.save_to_disk(tmp)
        meta = {"teacher": fp, "windows": n, "top_k": top_k, "format": 1}
        with open(os.path.join(tmp, "kdfast_teacher_cache.json"), "w") as fh:
            json.dump(meta, fh)
        if os.path.exists(path):
            import shutil
            shutil.rmtree(path)
        os.replace(tmp, path)  # atomic: a killed build leaves no half cache under the final name
        return cls(path, load_from_disk(path), meta)

    @classmethod
    def load(cls, path: str) -> "TeacherCache":
        from datasets import load_from_disk
        meta_path = os.path.join(path, "kdfast_teacher_cache.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{path!r} is not a kdfast teacher cache (no kdfast_teacher_cache.json)")
        with open(meta_path) as fh:
            meta = json.load(fh)
        return cls(path, load_from_disk(path), meta)

    def attach(self, features):
        """``features`` with the cache's logit columns added (rows must be the same windows, in order)."""
        from datasets import concatenate_datasets
        if len(features) != len(self.dataset):
            raise ValueError(f"teacher cache {self.path!r} has {len(self.dataset)} windows, the data has "
                             f"{len(features)}: it was built for other windows")
        if features["example_id"] != self.dataset["example_id"] or features["window"] != self.dataset["window"]:
            raise ValueError(f"teacher cache {self.path!r}: (example_id, window) keys differ from the data's")
        cols = [c for c in CACHE_COLUMNS + TOPK_COLUMNS if c in self.dataset.column_names]
        base = features.remove_columns([c for c in cols if c in features.column_names])
        return concatenate_datasets([base, self.dataset.select_columns(cols)], axis=1)


def scatter_teacher_logits(features: list[dict], L: int, shift=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, L]`` teacher start/end logits from cached rows: -inf outside CLS + context (and outside
    the top-k when the cache keeps only k). ``shift``: per-row offset added to token positions
    (left padding)."""
    B = len(features)
    out = [torch.full((B, L), float("-inf")) for _ in range(2)]
    for i, f in enumerate(features):
        s0 = 0 if shift is None else int(shift[i])
        pos = torch.cat([torch.tensor([f["cls_index"]]), torch.arange(f["context_start"], f["context_end"] + 1)]) + s0
        for o, key in zip(out, ("start", "end")):
            vals = torch.as_tensor(f[f"teacher_{key}"], dtype=torch.float32)
            idx = f.get(f"teacher_{key}_idx")
            p = pos if idx is None else pos[torch.as_tensor(idx, dtype=torch.long)]
            o[i, p] = vals
    return out[0], out[1]
