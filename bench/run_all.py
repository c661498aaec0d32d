"""Run every benchmark family in one process and print each comparison table.

    python bench/run_all.py            # default sizes of each family (CPU)
    python bench/run_all.py --quick    # the small sizes `make demo` uses
    python bench/run_all.py --device cuda --only kd_loss ternary

Each family is bench/<name>.py with a main(argv) that measures kdfast and its
baselines in the same run (bench/harness.py) and appends to bench/results/.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# family -> extra argv for --quick
FAMILIES = {
    "kd_loss": ["--quick"],
    "fused_linear_kd": ["--quick"],
    "layer_kd": ["--quick"],
    "layer_kd_hf": ["--quick"],
    "pruning": ["--quick"],
    "ternary": ["--quick"],
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (minutes on a 2-core CPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", nargs="*", help="families to run (default: all)")
    args = ap.parse_args(argv)
    names = args.only or list(FAMILIES)
    failed = []
    for name in names:
        if name not in FAMILIES:
            ap.error(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
        fam_argv = ["--device", args.device] + (FAMILIES[name] if args.quick else [])
        print(f"\n=== {name} {' '.join(fam_argv)} ===", flush=True)
        t0 = time.perf_counter()
        try:
            importlib.import_module(name).main(fam_argv)
        except Exception:  # one family failing must not hide the others' results
            traceback.print_exc()
            failed.append(name)
        print(f"=== {name}: {time.perf_counter() - t0:.0f} s ===", flush=True)
    print(f"\nresults: {os.path.join(HERE, 'results')}/*.csv   (plots: python bench/plot.py)")
    if failed:
        print(f"FAILED families: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
