"""Subpackages the README names are reachable after ``import kdfast``, lazily (import stays light)."""
import json
import subprocess
import sys

import pytest

PROBE = r"""
import json, sys
import kdfast, kdfast.qa, kdfast.distill
out = {"loaded_early": sorted(m for m in ("transformers", "datasets", "kdfast.qa.load", "kdfast.distill.trainer")
                              if m in sys.modules)}
out["names"] = [kdfast.compress.quantize.__name__, kdfast.hf.capture.__name__, kdfast.qa.load_squad.__name__,
                kdfast.distill.DistillationTrainer.__name__, kdfast.active.get_strategy.__name__,
                kdfast.augment.AugmentConfig.__name__, kdfast.study.run_study.__name__]
errors = []
for mod in (kdfast, kdfast.qa, kdfast.distill):
    try:
        getattr(mod, "nope")
    except AttributeError as e:
        errors.append(str(e))
out["errors"] = errors
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe():
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_subpackages_reachable_after_import_kdfast(probe):
    assert probe["names"] == ["quantize", "capture", "load_squad", "DistillationTrainer", "get_strategy",
                              "AugmentConfig", "run_study"]


def test_import_kdfast_does_not_load_the_pipeline_stack(probe):
    assert probe["loaded_early"] == []


def test_unknown_names_raise_attribute_error(probe):
    assert len(probe["errors"]) == 3 and "'kdfast.qa' has no attribute 'nope'" in probe["errors"][1]
