"""`python -m kdfast.demo` (what `make demo` runs): the kernel benchmark suite at
small sizes, printing kdfast against the baselines a user would pick instead.

Needs the source tree's bench/ folder (a clone of the repository).
"""
import os
import sys


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench = os.path.join(root, "bench")
    if not os.path.exists(os.path.join(bench, "run_all.py")):
        sys.exit("kdfast.demo: bench/ not found next to the package; run it from a clone of the repository")
    from kdfast import info
    info.main(["--short"])
    sys.path.insert(0, bench)
    import run_all
    return run_all.main(["--quick"] + sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
