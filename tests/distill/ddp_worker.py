"""``torchrun ... tests/distill/ddp_worker.py RECORD_DIR <kdfast command> [flags]``: runs the ``kdfast``
command line in one process of a (distributed) job and writes ``RECORD_DIR/rank<R>.json`` with

- ``teacher_windows``: windows the teacher cache ran the teacher on in this process (0: it read a
  cache another rank had written),
- ``cache_paths``: the cache directories this process used,
- ``write_results``: how many times this process wrote metrics.json / results.md / README.md;

and, when the run has layer losses, ``RECORD_DIR/layer_kd_rank<R>.pt``: this process's LayerKD
state (projections) at the end of training.

Used by test_ddp.py (also in-process, for the 1-process reference run)."""
from __future__ import annotations

import json
import os
import sys


def main(argv) -> int:
    """``argv``: RECORD_DIR, then the kdfast command and its flags. Returns kdfast's exit code."""
    record_dir, args = argv[0], argv[1:]
    import kdfast.qa.evaluate as ev
    from kdfast.cli.main import main as kdfast_main
    import torch
    from kdfast.distill import report, stage, teacher_cache

    seen = {"teacher_windows": 0, "cache_paths": [], "write_results": 0}
    predict, write = ev.predict_logits, report.write_results
    original = teacher_cache.TeacherCache.__dict__["build"]  # the classmethod object itself
    build = original.__func__

    def counting_predict(model, features, *a, **k):
        seen["teacher_windows"] += len(features)
        return predict(model, features, *a, **k)

    def recording_build(cls, *a, **k):
        ev.predict_logits = counting_predict  # TeacherCache.build imports it from the module at call time
        try:
            cache = build(cls, *a, **k)
        finally:
            ev.predict_logits = predict
        seen["cache_paths"].append(cache.path)
        return cache

    def counting_write(*a, **k):
        seen["write_results"] += 1
        return write(*a, **k)

    rank = int(os.environ.get("RANK", "0"))
    train_stage = stage.train_stage

    def dumping_train_stage(*a, **k):
        trainer = train_stage(*a, **k)
        if trainer.layer_kd is not None:
            torch.save(trainer.layer_kd.state_dict(), os.path.join(record_dir, f"layer_kd_rank{rank}.pt"))
        return trainer

    teacher_cache.TeacherCache.build = classmethod(recording_build)
    report.write_results = counting_write
    stage.train_stage = dumping_train_stage  # cmd_distill imports it from the module at call time
    try:
        rc = kdfast_main(args)
    finally:
        teacher_cache.TeacherCache.build = original
        report.write_results = write
        stage.train_stage = train_stage
    with open(os.path.join(record_dir, f"rank{rank}.json"), "w") as fh:
        json.dump({**seen, "world_size": int(os.environ.get("WORLD_SIZE", "1"))}, fh)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
