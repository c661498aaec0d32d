"""The study grid: which knobs, which values, and one run per point x seed.

A grid file (YAML or JSON) has two sections; every key is optional:

    grid:                      # lists: the study runs their cross product (x seeds)
      mapping: [uniform, last_k, mean, learned]      # kdfast.nn.layer_mapping.MAPPINGS
      attention_loss: [attention_score, attention_kl] # or value_relation, none
      hidden_loss: [hidden]                          # or hidden_cosine, none
      logit_loss: [kl]                               # kl, reverse_kl, jsd, mse
      attention_weight: [0.5, 1.0]
      hidden_weight: [0.5, 1.0]
      embedding_weight: [1.0]
      layer_weight_schedule: [constant]              # or two_stage:F
      term_weighting: [fixed]                        # or ema, ema:<decay>
      seed: [0, 1, 2]
    train:                     # scalars shared by every run
      student_layers: "0,2"    # teacher layers the student starts from (kdfast distill --student_layers)
      max_steps: 60
      learning_rate: 1.0e-3
      batch_size: 16
      temperature: 2.0
      alpha: 0.5
      max_seq_length: 256
      doc_stride: 96
      max_train_questions: null  # first n train questions (null: all)
      max_eval_questions: null
      include_default: false     # add kdfast's default LayerKD setting (LayerKD() losses and mapping)
      include_logits_only: false # add the logits-only run (DistillConfig() default, no layer terms)

A term whose loss is ``none`` or whose weight is 0 is left out, so points that differ only in
a left-out term's weight are one configuration. Each configuration is named by its knobs.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os

GRID_KEYS = {"mapping": ["uniform"], "attention_loss": ["attention_score"], "hidden_loss": ["hidden"],
             "logit_loss": ["kl"], "attention_weight": [1.0], "hidden_weight": [1.0], "embedding_weight": [1.0],
             "layer_weight_schedule": ["constant"], "term_weighting": ["fixed"], "seed": [0]}
TRAIN_KEYS = {"student_layers": "0,2", "max_steps": 60, "learning_rate": 1e-3, "batch_size": 16,
              "temperature": 2.0, "alpha": 0.5, "max_seq_length": 256, "doc_stride": 96,
              "max_train_questions": None, "max_eval_questions": None, "include_default": False,
              "include_logits_only": False}
ATTENTION_LOSSES = ("attention_score", "attention_kl", "value_relation", "none")
HIDDEN_LOSSES = ("hidden", "hidden_cosine", "none")
KNOBS = ("mapping", "attention_loss", "attention_weight", "hidden_loss", "hidden_weight", "embedding_weight",
         "logit_loss", "layer_weight_schedule", "term_weighting")
# kdfast's default layer KD setting: LayerKD()'s losses (embedding, hidden, attention_score, weight 1) and
# mapping (mean: bench/results/kd_study.md; uniform before 2026-12-06)
DEFAULT_CONFIG = dict(mapping="mean", attention_loss="attention_score", attention_weight=1.0, hidden_loss="hidden",
                      hidden_weight=1.0, embedding_weight=1.0, logit_loss="kl", layer_weight_schedule="constant",
                      term_weighting="fixed")
LOGITS_ONLY = dict(mapping="uniform", attention_loss="none", attention_weight=0.0, hidden_loss="none",
                   hidden_weight=0.0, embedding_weight=0.0, logit_loss="kl", layer_weight_schedule="constant",
                   term_weighting="fixed")


class GridError(ValueError):
    """A bad grid file or flag; the message names the key."""


@dataclasses.dataclass
class Run:
    """One short distillation: a configuration (``knobs``) and a seed."""
    knobs: dict
    seed: int

    @property
    def config_name(self) -> str:
        return config_name(self.knobs)

    @property
    def run_id(self) -> str:
        return f"{self.config_name}|seed={self.seed}"


def _normal(knobs: dict) -> dict:
    k = dict(knobs)
    if k["attention_loss"] == "none" or float(k["attention_weight"]) == 0:
        k["attention_loss"], k["attention_weight"] = "none", 0.0
    if k["hidden_loss"] == "none" or float(k["hidden_weight"]) == 0:
        k["hidden_loss"], k["hidden_weight"] = "none", 0.0
    for w in ("attention_weight", "hidden_weight", "embedding_weight"):
        k[w] = float(k[w])
    if k["attention_loss"] == "none" and k["hidden_loss"] == "none" and k["embedding_weight"] == 0:
        k["mapping"] = "none"  # logits only: no mapping is used
    return k


def config_name(knobs: dict) -> str:
    k = _normal(knobs)
    parts = [f"map={k['mapping']}", f"att={k['attention_loss']}:{k['attention_weight']:g}",
             f"hid={k['hidden_loss']}:{k['hidden_weight']:g}", f"emb={k['embedding_weight']:g}",
             f"logit={k['logit_loss']}"]
    if k["layer_weight_schedule"] != "constant":
        parts.append(f"sched={k['layer_weight_schedule']}")
    if k["term_weighting"] != "fixed":
        parts.append(f"tw={k['term_weighting']}")
    return ",".join(parts)


def layer_losses(knobs: dict) -> dict | None:
    """The ``DistillConfig.layer_losses`` of a configuration (None: logits only)."""
    k = _normal(knobs)
    out = {}
    if k["embedding_weight"] > 0:
        out["embedding"] = k["embedding_weight"]
    if k["hidden_loss"] != "none":
        out[k["hidden_loss"]] = k["hidden_weight"]
    if k["attention_loss"] != "none":
        out[k["attention_loss"]] = k["attention_weight"]
    return out or None


def distill_config_dict(knobs: dict, train: dict) -> dict:
    """The :class:`kdfast.distill.trainer.DistillConfig` fields of a configuration."""
    k = _normal(knobs)
    return {"temperature": float(train["temperature"]), "alpha": float(train["alpha"]),
            "layer_losses": layer_losses(k), "layer_mapping": "uniform" if k["mapping"] == "none" else k["mapping"],
            "logit_loss": k["logit_loss"], "layer_weight_schedule": k["layer_weight_schedule"],
            "term_weighting": k["term_weighting"]}


@dataclasses.dataclass
class StudyGrid:
    grid: dict
    train: dict

    def runs(self) -> list[Run]:
        """Every (configuration, seed) once, in grid order (duplicates after normalisation dropped)."""
        keys = [k for k in GRID_KEYS if k != "seed"]
        configs, seen = [], set()
        extra = ([DEFAULT_CONFIG] if self.train["include_default"] else []) + \
            ([LOGITS_ONLY] if self.train["include_logits_only"] else [])
        for values in list(itertools.product(*(self.grid[k] for k in keys))):
            configs.append(dict(zip(keys, values)))
        configs += [dict(c) for c in extra]
        out = []
        for c in configs:
            c = _normal(c)
            name = config_name(c)
            if name in seen:
                continue
            seen.add(name)
            out += [Run(c, int(s)) for s in self.grid["seed"]]
        return out


def _as_list(key, value):
    if isinstance(value, (list, tuple)):
        vals = list(value)
    elif isinstance(value, str):
        vals = [v.strip() for v in value.split(",") if v.strip()]
    else:
        vals = [value]
    if not vals:
        raise GridError(f"grid key {key!r}: needs at least one value")
    return vals


def _check_values(grid: dict, train: dict):
    from kdfast.distill.trainer import DistillConfig, LOGIT_LOSSES
    from kdfast.nn.layer_mapping import MAPPINGS
    choices = {"mapping": MAPPINGS, "attention_loss": ATTENTION_LOSSES, "hidden_loss": HIDDEN_LOSSES,
               "logit_loss": LOGIT_LOSSES}
    for key, allowed in choices.items():
        for v in grid[key]:
            if v not in allowed:
                raise GridError(f"grid key {key!r}: {v!r} is not one of {', '.join(allowed)}")
    for key in ("attention_weight", "hidden_weight", "embedding_weight", "seed"):
        for i, v in enumerate(grid[key]):
            try:
                x = float(v) if key != "seed" else int(v)
            except (TypeError, ValueError):
                raise GridError(f"grid key {key!r}: {v!r} is not a number") from None
            if x < 0:
                raise GridError(f"grid key {key!r}: {v!r} must be >= 0")
            grid[key][i] = x
    for key in ("layer_weight_schedule", "term_weighting"):
        for v in grid[key]:
            try:
                DistillConfig(**{key: v})
            except ValueError as e:
                raise GridError(f"grid key {key!r}: {e}") from None
    for key in ("max_steps", "batch_size", "max_seq_length", "doc_stride"):
        try:
            train[key] = int(train[key])
        except (TypeError, ValueError):
            raise GridError(f"train key {key!r}: {train[key]!r} is not an integer") from None
        if train[key] < 1:
            raise GridError(f"train key {key!r}: must be >= 1, got {train[key]}")
    for key in ("learning_rate", "temperature", "alpha"):
        try:
            train[key] = float(train[key])
        except (TypeError, ValueError):
            raise GridError(f"train key {key!r}: {train[key]!r} is not a number") from None
    try:
        DistillConfig(temperature=train["temperature"], alpha=train["alpha"])
    except ValueError as e:
        raise GridError(f"train keys 'temperature' / 'alpha': {e}") from None


def make_grid(data: dict | None = None, overrides: dict | None = None) -> StudyGrid:
    """A :class:`StudyGrid` from a parsed grid file (``{"grid": {...}, "train": {...}}``) and flag
    ``overrides`` (same keys, either section; flags win). Unknown keys raise :class:`GridError`."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise GridError(f"a grid file must be a mapping with 'grid' and 'train' sections, got {type(data).__name__}")
    unknown = set(data) - {"grid", "train"}
    if unknown:
        raise GridError(f"unknown top-level key {sorted(unknown)[0]!r}; a grid file has 'grid' and 'train'")
    grid_in, train_in = data.get("grid") or {}, data.get("train") or {}
    for sec, d in (("grid", grid_in), ("train", train_in)):
        if not isinstance(d, dict):
            raise GridError(f"section {sec!r} must be a mapping, got {type(d).__name__}")
    for key in grid_in:
        if key not in GRID_KEYS:
            hint = " (a 'train' key)" if key in TRAIN_KEYS else ""
            raise GridError(f"unknown grid key {key!r}{hint}; grid keys are {', '.join(GRID_KEYS)}")
    for key in train_in:
        if key not in TRAIN_KEYS:
            hint = " (a 'grid' key)" if key in GRID_KEYS else ""
            raise GridError(f"unknown train key {key!r}{hint}; train keys are {', '.join(TRAIN_KEYS)}")
    grid = {k: _as_list(k, grid_in.get(k, v)) for k, v in GRID_KEYS.items()}
    train = {k: train_in.get(k, v) for k, v in TRAIN_KEYS.items()}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key in GRID_KEYS:
            grid[key] = _as_list(key, value)
        elif key in TRAIN_KEYS:
            train[key] = value
        else:
            raise GridError(f"unknown study option {key!r}")
    _check_values(grid, train)
    return StudyGrid(grid, train)


def load_grid(path: str | None, overrides: dict | None = None) -> StudyGrid:
    """Read a YAML (``.yaml`` / ``.yml``) or JSON grid file; see :func:`make_grid`."""
    if path is None:
        return make_grid({}, overrides)
    if not os.path.exists(path):
        raise GridError(f"--grid {path}: no such file")
    with open(path) as fh:
        text = fh.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the file's
        raise GridError(f"--grid {path}: cannot parse: {e}") from None
    return make_grid(data, overrides)
