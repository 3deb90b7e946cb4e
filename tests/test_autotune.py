"""The autotuner behind ``algo="auto"``: measures once, caches in memory and on disk, stays out of the way.

Every test gets its own cache folder (``FASTCONV_CACHE_DIR``) and lowers ``MIN_MACS`` to 0 so that
small, fast geometries are tuned. Measurements are counted by wrapping ``autotune._time_candidate``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as TF

import fastconv
import fastconv.functional as F
from fastconv import autotune, backends, registry
from fastconv.ops.conv import make_geometry
from conftest import assert_close

REPO = Path(__file__).resolve().parent.parent
# (N, C, H, W), K, 3x3 kernel, padding 1, float64 (the reference dtype).
X_SHAPE, K = (2, 4, 10, 9), 6


def _data(requires_grad=False):
    x = torch.randn(X_SHAPE, dtype=torch.float64, requires_grad=requires_grad)
    w = torch.randn(K, X_SHAPE[1], 3, 3, dtype=torch.float64, requires_grad=requires_grad)
    return x, w


def _geometry():
    return make_geometry(2, X_SHAPE[0], X_SHAPE[1], K, 1, X_SHAPE[2:], (3, 3), None, [1, 1], [1, 1], [1, 1],
                         [1, 1], torch.float64, backends.current())


def _key(pass_="forward"):
    return (_geometry().key(), pass_, torch.get_num_threads())


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """A private cache folder, tuning on for every size, a clean memory cache before and after."""
    monkeypatch.setenv("FASTCONV_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FASTCONV_AUTOTUNE", raising=False)
    monkeypatch.setattr(autotune, "MIN_MACS", 0)
    monkeypatch.setattr(autotune, "_override", None)
    monkeypatch.setattr(autotune, "_warned", set())
    autotune.clear_autotune_cache(disk=False)
    yield tmp_path / "autotune.json"
    autotune.clear_autotune_cache(disk=False)


@pytest.fixture
def measured(monkeypatch):
    """List of (algorithm, pass) the tuner timed."""
    calls = []
    real = autotune._time_candidate

    def counting(alg, geom, pass_, inputs, best_ms):
        calls.append((alg.name, pass_))
        return real(alg, geom, pass_, inputs, best_ms)

    monkeypatch.setattr(autotune, "_time_candidate", counting)
    return calls


def _candidates():
    names = [a.name for a in registry.candidates(_geometry())]
    assert len(names) >= 2, f"this geometry needs two candidates to be worth tuning, registry has {names}"
    return names


def test_choice_is_measured_once_then_cached(measured):
    names = _candidates()
    x, w = _data(requires_grad=True)
    y = F.conv2d(x, w, padding=1)
    assert sorted(measured) == sorted((n, "forward") for n in names)
    choice = fastconv.autotune_cache()[_key()]
    assert choice.algo in names and set(choice.times_ms) == set(names) and choice.candidates == tuple(names)
    assert choice.times_ms[choice.algo] == min(choice.times_ms.values())

    F.conv2d(x, w, padding=1)
    assert len(measured) == len(names), "the second call measured again"

    # Each pass has its own choice: the backward tunes grad_input and grad_weight once each.
    y.backward(torch.ones_like(y))
    assert sorted(p for _, p in measured).count("grad_input") == len(names)
    assert sorted(p for _, p in measured).count("grad_weight") == len(names)
    assert {_key("grad_input"), _key("grad_weight")} <= set(fastconv.autotune_cache())
    F.conv2d(x, w, padding=1).backward(torch.ones_like(y))
    assert len(measured) == 3 * len(names)


@pytest.mark.parametrize("winner_index", [0, 1, -1])
def test_the_tuned_winner_runs_and_matches_torch(winner_index, monkeypatch):
    names = _candidates()
    winner = names[winner_index]
    # Fake timings so that ``winner`` is fastest: checks that the measured winner is what runs.
    monkeypatch.setattr(autotune, "_time_candidate",
                        lambda alg, geom, pass_, inputs, best: 1.0 if alg.name == winner else 2.0)
    x, w = _data(requires_grad=True)
    b = torch.randn(K, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(x, w, b, padding=1)
    ref = TF.conv2d(x, w, b, padding=1)
    assert_close(y, ref, what="forward")
    g = torch.randn_like(ref)
    for name, got, want in zip(("grad_input", "grad_weight", "grad_bias"),
                               torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g)):
        assert_close(got, want, what=name)
    for pass_ in registry.PASSES:
        assert fastconv.autotune_cache()[_key(pass_)].algo == winner
        assert registry.choose("auto", _geometry(), pass_).name == winner


def test_really_measured_choice_matches_torch():
    x, w = _data()
    assert_close(F.conv2d(x, w, padding=1), TF.conv2d(x, w, padding=1), what="forward")
    assert fastconv.autotune_cache()[_key()].algo in _candidates()


def test_disk_round_trip_after_clearing_memory(isolated_cache, measured):
    names = _candidates()
    x, w = _data()
    F.conv2d(x, w, padding=1)
    algo = fastconv.autotune_cache()[_key()].algo
    data = json.loads(isolated_cache.read_text())
    (section,) = data["sections"].values()
    assert section["fingerprint"] == autotune.fingerprint()
    assert [e["algo"] for e in section["entries"]] == [algo]

    fastconv.clear_autotune_cache(disk=False)
    assert isolated_cache.exists()
    F.conv2d(x, w, padding=1)
    assert len(measured) == len(names), "the choice stored on disk was measured again"
    assert fastconv.autotune_cache()[_key()].algo == algo


def test_disk_round_trip_in_a_new_process(isolated_cache):
    x, w = _data()
    F.conv2d(x, w, padding=1)
    algo = fastconv.autotune_cache()[_key()].algo
    script = (
        "import json, torch, fastconv\n"
        "from fastconv import autotune\n"
        "autotune.MIN_MACS = 0\n"
        "calls = []\n"
        "real = autotune._time_candidate\n"
        "autotune._time_candidate = lambda *a: calls.append(a) or real(*a)\n"
        f"x = torch.randn{X_SHAPE!r}.double(); w = torch.randn({K}, {X_SHAPE[1]}, 3, 3).double()\n"
        "fastconv.functional.conv2d(x, w, padding=1)\n"
        "print(json.dumps({'measured': len(calls), 'algos': [c.algo for c in fastconv.autotune_cache().values()]}))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"measured": 0, "algos": [algo]}


def test_cache_from_another_machine_or_version_is_ignored(isolated_cache, measured, monkeypatch):
    names = _candidates()
    x, w = _data()
    F.conv2d(x, w, padding=1)
    assert len(measured) == len(names)
    # The same file, read by "another fastconv version": its entries do not apply.
    monkeypatch.setattr(autotune, "_FINGERPRINT", dict(autotune.fingerprint(), fastconv="0.0.0-other"))
    fastconv.clear_autotune_cache(disk=False)
    assert _key() not in fastconv.autotune_cache()
    F.conv2d(x, w, padding=1)
    assert len(measured) == 2 * len(names)
    # Both machines' entries are kept side by side.
    assert len(json.loads(isolated_cache.read_text())["sections"]) == 2


def test_foreign_entry_in_file_is_not_trusted(isolated_cache, measured):
    names = _candidates()
    entry = {"key": json.loads(json.dumps(_geometry().key())), "pass": "forward",
             "threads": torch.get_num_threads(), "algo": names[0], "times_ms": {}, "candidates": names}
    foreign = {"fingerprint": dict(autotune.fingerprint(), cpu="some other CPU"), "entries": [entry]}
    isolated_cache.write_text(json.dumps({"format": 1, "sections": {"0123456789abcdef": foreign}}))
    x, w = _data()
    F.conv2d(x, w, padding=1)
    assert len(measured) == len(names)


def test_entry_for_other_candidates_is_retuned(isolated_cache, measured):
    # A choice made before an algorithm was registered must not hide the new algorithm.
    names = _candidates()
    x, w = _data()
    F.conv2d(x, w, padding=1)
    data = json.loads(isolated_cache.read_text())
    for section in data["sections"].values():
        for e in section["entries"]:
            e["candidates"] = e["candidates"][:1]
    isolated_cache.write_text(json.dumps(data))
    fastconv.clear_autotune_cache(disk=False)
    F.conv2d(x, w, padding=1)
    assert len(measured) == 2 * len(names)


@pytest.mark.parametrize("content", ["{not json", "[]", '{"format": 99, "sections": {}}', ""])
def test_corrupt_file_is_tolerated_and_replaced(isolated_cache, measured, content):
    isolated_cache.write_text(content)
    x, w = _data()
    with pytest.warns(RuntimeWarning, match="corrupt cache file"):
        y = F.conv2d(x, w, padding=1)
    assert_close(y, TF.conv2d(x, w, padding=1), what="forward")
    assert len(measured) == len(_candidates())
    data = json.loads(isolated_cache.read_text())  # rewritten whole
    assert data["format"] == autotune.FILE_FORMAT and len(data["sections"]) == 1


def test_clear_forgets_memory_and_disk(isolated_cache, measured):
    names = _candidates()
    x, w = _data()
    F.conv2d(x, w, padding=1)
    assert isolated_cache.exists() and len(fastconv.autotune_cache()) == 1
    fastconv.clear_autotune_cache()
    assert not isolated_cache.exists()
    assert len(fastconv.autotune_cache()) == 0
    F.conv2d(x, w, padding=1)
    assert len(measured) == 2 * len(names)


def _heuristic_pick(pass_="forward"):
    geom = _geometry()
    return registry._HEURISTICS[geom.target](geom, pass_)


def test_disabled_by_context_manager_uses_heuristic(isolated_cache, measured):
    x, w = _data()
    assert autotune.enabled() is True
    with autotune.enabled(False):
        assert autotune.enabled() is False
        y = F.conv2d(x, w, padding=1)
        assert registry.choose("auto", _geometry(), "forward").name == _heuristic_pick()
    assert autotune.enabled() is True
    assert measured == [] and not isolated_cache.exists() and len(fastconv.autotune_cache()) == 0
    assert_close(y, TF.conv2d(x, w, padding=1), what="forward")


def test_disabled_by_setter_and_by_environment(measured, monkeypatch):
    x, w = _data()
    autotune.enabled(False)  # the fixture restores the previous setting
    F.conv2d(x, w, padding=1)
    assert measured == []
    monkeypatch.setattr(autotune, "_override", None)
    monkeypatch.setenv("FASTCONV_AUTOTUNE", "0")
    assert autotune.enabled() is False
    assert registry.choose("auto", _geometry(), "grad_weight").name == _heuristic_pick("grad_weight")
    assert measured == []
    with autotune.enabled(True):  # code beats the environment
        F.conv2d(x, w, padding=1)
    assert len(measured) == len(_candidates())


def test_small_geometry_uses_heuristic(measured, monkeypatch):
    monkeypatch.setattr(autotune, "MIN_MACS", _geometry().macs + 1)
    x, w = _data()
    F.conv2d(x, w, padding=1)
    assert measured == [] and len(fastconv.autotune_cache()) == 0


def test_single_candidate_is_not_measured(measured, monkeypatch):
    only = registry.candidates(_geometry())[-1]
    monkeypatch.setattr(registry, "candidates", lambda geom: [only])
    assert registry.choose("auto", _geometry(), "forward") is only
    assert measured == [] and len(fastconv.autotune_cache()) == 0


def test_choose_inside_the_tuner_gets_the_heuristic(monkeypatch):
    # An algorithm that delegated to choose("auto") while being measured must not start a nested tuning.
    nested = []
    real = autotune._time_candidate

    def reentrant(alg, geom, pass_, inputs, best):
        nested.append(registry.choose("auto", geom, pass_).name)
        return real(alg, geom, pass_, inputs, best)

    monkeypatch.setattr(autotune, "_time_candidate", reentrant)
    x, w = _data()
    F.conv2d(x, w, padding=1)
    assert nested == [_heuristic_pick()] * len(_candidates())
    assert list(fastconv.autotune_cache()) == [_key()]


def test_failing_candidate_is_skipped(monkeypatch):
    names = _candidates()
    real = autotune._time_candidate

    def first_fails(alg, geom, pass_, inputs, best):
        if alg.name == names[0]:
            raise RuntimeError("kernel exploded")
        return real(alg, geom, pass_, inputs, best)

    monkeypatch.setattr(autotune, "_time_candidate", first_fails)
    x, w = _data()
    with pytest.warns(RuntimeWarning, match="kernel exploded"):
        y = F.conv2d(x, w, padding=1)
    assert_close(y, TF.conv2d(x, w, padding=1), what="forward")
    choice = fastconv.autotune_cache()[_key()]
    assert choice.algo != names[0] and choice.times_ms[names[0]] == float("inf")


def test_fake_and_meta_tensors_never_tune(measured):
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = torch.ops.fastconv.conv2d
    args = ([1, 1], [1, 1], [1, 1], [1, 1], 1, "auto")
    with FakeTensorMode():
        x, w = torch.empty(X_SHAPE, dtype=torch.float64), torch.empty(K, X_SHAPE[1], 3, 3, dtype=torch.float64)
        assert op(x, w, None, *args).shape == (X_SHAPE[0], K, *X_SHAPE[2:])
    x, w = torch.empty(X_SHAPE, device="meta"), torch.empty(K, X_SHAPE[1], 3, 3, device="meta")
    assert op(x, w, None, *args).shape == (X_SHAPE[0], K, *X_SHAPE[2:])
    assert measured == [] and len(fastconv.autotune_cache()) == 0


def test_no_tuning_while_compiling(measured, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert registry.choose("auto", _geometry(), "forward").name == _heuristic_pick()
    assert measured == [] and len(fastconv.autotune_cache()) == 0


def test_cache_view_is_read_only():
    x, w = _data()
    F.conv2d(x, w, padding=1)
    view = fastconv.autotune_cache()
    with pytest.raises(TypeError):
        view[_key()] = None
