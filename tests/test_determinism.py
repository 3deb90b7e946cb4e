"""Reproducible ``algo="auto"``: same inputs and thread count give the same bits in any process.

``"auto"`` normally chooses by timing, and timing differs between processes (load, a cold cache),
so two fresh processes could run different algorithms and round differently. Under
``torch.use_deterministic_algorithms(True)``, ``fastconv.set_deterministic(True)`` or
``FASTCONV_DETERMINISTIC=1`` the heuristic chooses and nothing is measured. Each child below gets
an empty cache folder of its own, so without the switch it would tune.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

_CHILD = r"""
import hashlib, json, sys, torch, fastconv
from fastconv import autotune
mode = sys.argv[1]
if mode == "torch":
    torch.use_deterministic_algorithms(True)
elif mode == "api":
    fastconv.set_deterministic(True)
calls = []
real = autotune._time_candidate
autotune._time_candidate = lambda *a: calls.append(a[0].name) or real(*a)
torch.manual_seed(2024)
x = torch.randn(2, 16, 32, 32, requires_grad=True)
w = torch.randn(16, 16, 3, 3, requires_grad=True)
y = fastconv.functional.conv2d(x, w, padding=1)
g = torch.randn_like(y)
gx, gw = torch.autograd.grad(y, (x, w), g)
digest = hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in (y, gx, gw))).hexdigest()
geom_macs = 2 * 16 * 16 * 32 * 32 * 9
print(json.dumps({"digest": digest, "measured": len(calls), "cached": len(fastconv.autotune_cache()),
                  "tunable": geom_macs >= autotune.MIN_MACS and autotune.enabled()}))
"""


def _child(mode: str, cache_dir: Path, **env) -> dict:
    full_env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    FASTCONV_CACHE_DIR=str(cache_dir), **env)
    full_env.pop("FASTCONV_AUTOTUNE", None)
    if "FASTCONV_DETERMINISTIC" not in env:
        full_env.pop("FASTCONV_DETERMINISTIC", None)
    proc = subprocess.run([sys.executable, "-c", _CHILD, mode], env=full_env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["torch", "api", "env"])
def test_two_fresh_processes_give_identical_bits(tmp_path, mode):
    env = {"FASTCONV_DETERMINISTIC": "1"} if mode == "env" else {}
    first = _child(mode, tmp_path / "a", **env)
    second = _child(mode, tmp_path / "b", **env)
    assert first["tunable"], "the conv is below the tuning threshold: the test would prove nothing"
    assert first["measured"] == second["measured"] == 0, "deterministic mode measured"
    assert first["cached"] == second["cached"] == 0
    assert first["digest"] == second["digest"]


def test_without_the_switch_the_same_conv_is_tuned(tmp_path):
    """The control: the conv above is one the tuner measures when not in deterministic mode (measured on
    its first call: the CPU's default mode would tune it over its next calls instead)."""
    out = _child("none", tmp_path / "c", FASTCONV_AUTOTUNE_MODE="measure")
    assert out["measured"] > 0 and out["cached"] == 3
