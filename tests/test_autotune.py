"""The autotuner behind ``algo="auto"``: measures once, caches in memory and on disk, stays out of the way.

Every test gets its own cache folder (``FASTCONV_CACHE_DIR``) and lowers ``MIN_MACS`` to 0 so that
small, fast geometries are tuned. Measurements are counted by wrapping ``autotune._time_candidate``.
The cache file is an SQLite database (``autotune.sqlite``); tests read and damage it directly.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import fastconv
import fastconv.functional as F
from fastconv import autotune, backends, registry
from fastconv.ops.conv import make_geometry
from helpers import assert_close

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


#: the real load check (the autouse fixture below replaces it for every other test)
OVERSUBSCRIBED = autotune.oversubscribed


def _key(pass_="forward"):
    return autotune.cache_key(_geometry(), pass_)


def _rows(path, where=""):
    """The cache file's entries as dicts (read with a connection of our own)."""
    conn = sqlite3.connect(str(path))
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(f"SELECT * FROM {autotune._TABLE} {where}")]
    finally:
        conn.close()


def _sql(path, statement, args=()):
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        conn.execute(statement, args)
    finally:
        conn.close()


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """A private cache folder, tuning on for every size, a clean memory cache before and after."""
    monkeypatch.setenv("FASTCONV_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FASTCONV_AUTOTUNE", raising=False)
    monkeypatch.setattr(autotune, "MIN_MACS", 0)
    # these tests check the measuring tuner (the GPU's, and FASTCONV_AUTOTUNE_MODE=measure); the default
    # CPU mode, tuning on the real calls, has its own tests (test_online_*), which switch back
    monkeypatch.setattr(autotune, "MODE", "measure")
    monkeypatch.setattr(autotune, "_override", None)
    monkeypatch.setattr(autotune, "_warned", set())
    monkeypatch.delenv("FASTCONV_AUTOTUNE_MAX_ENTRIES", raising=False)
    monkeypatch.delenv("FASTCONV_DETERMINISTIC", raising=False)
    monkeypatch.setattr(autotune, "_deterministic", None)
    # choices measured on an oversubscribed machine stay out of the file (tested below); the tests that read the
    # file must not depend on how loaded the machine running them is
    monkeypatch.setattr(autotune, "oversubscribed", lambda: False)
    autotune.clear_autotune_cache(disk=False)
    yield tmp_path / autotune.FILE_NAME
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
    (row,) = _rows(isolated_cache)
    assert row["fp"] == autotune._fingerprint_id() and row["algo"] == algo

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
    assert len({r["fp"] for r in _rows(isolated_cache)}) == 2


def test_foreign_entry_in_file_is_not_trusted(isolated_cache, measured):
    names = _candidates()
    x, w = _data()
    F.conv2d(x, w, padding=1)
    _sql(isolated_cache, f"UPDATE {autotune._TABLE} SET fp = 'some-other-cpu'")
    fastconv.clear_autotune_cache(disk=False)
    F.conv2d(x, w, padding=1)
    assert len(measured) == 2 * len(names)


def test_entry_for_other_candidates_is_retuned(isolated_cache, measured):
    # A choice made before an algorithm was registered must not hide the new algorithm.
    names = _candidates()
    x, w = _data()
    F.conv2d(x, w, padding=1)
    _sql(isolated_cache, f"UPDATE {autotune._TABLE} SET candidates = ?", (json.dumps(names[:1]),))
    fastconv.clear_autotune_cache(disk=False)
    F.conv2d(x, w, padding=1)
    assert len(measured) == 2 * len(names)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b"[" * 100000 + b"]" * 100000,
                                     b"SQLite format 3\x00" + b"\x00" * 200, b"x"])
def test_corrupt_file_is_set_aside_with_one_warning(isolated_cache, measured, content):
    isolated_cache.parent.mkdir(parents=True, exist_ok=True)
    isolated_cache.write_bytes(content)
    x, w = _data()
    with pytest.warns(RuntimeWarning, match="unusable") as record:
        y = F.conv2d(x, w, padding=1)
        F.conv2d(x, w, padding=1)
        fastconv.clear_autotune_cache(disk=False)
        fastconv.autotune_cache()
    assert len([r for r in record if "unusable" in str(r.message)]) == 1
    assert_close(y, TF.conv2d(x, w, padding=1), what="forward")
    assert len(measured) == len(_candidates())
    (aside,) = list(isolated_cache.parent.glob(f"{autotune.FILE_NAME}.corrupt-*"))
    assert aside.read_bytes() == content
    assert len(_rows(isolated_cache)) == 1  # a fresh file holds the new choice
    fastconv.clear_autotune_cache()  # and clearing works on it


def test_damaged_rows_are_ignored(isolated_cache, measured):
    names = _candidates()
    x, w = _data()
    F.conv2d(x, w, padding=1)
    deep = "[" * 50000 + "]" * 50000
    for column, value in (("times", deep), ("candidates", b"\xff not json"), ("key", deep),
                          ("times", '{"direct": "NaN"}')):
        fastconv.clear_autotune_cache()
        F.conv2d(x, w, padding=1)
        _sql(isolated_cache, f"UPDATE {autotune._TABLE} SET {column} = CAST(? AS TEXT)", (value,))
        fastconv.clear_autotune_cache(disk=False)
        F.conv2d(x, w, padding=1)  # the damaged entry is measured again, nothing raises
        assert fastconv.autotune_cache()[_key()].algo in names
    assert len(measured) == 9 * len(names)  # the first call, then twice per damage


@pytest.mark.parametrize("algo", ["no-such-algorithm", "depthwise"])
def test_entry_naming_an_unusable_algorithm_is_ignored(isolated_cache, measured, algo):
    # depthwise is registered but refuses this dense geometry
    names = _candidates()
    x, w = _data()
    F.conv2d(x, w, padding=1)
    _sql(isolated_cache, f"UPDATE {autotune._TABLE} SET algo = ?", (algo,))
    fastconv.clear_autotune_cache(disk=False)
    y = F.conv2d(x, w, padding=1)
    assert_close(y, TF.conv2d(x, w, padding=1), what="forward")
    assert len(measured) == 2 * len(names)
    assert fastconv.autotune_cache()[_key()].algo in names
    # iterating over the cache sees every entry (a bad entry once ended such loops silently)
    assert list(fastconv.autotune_cache()) == [_key()]


def _run_child(script: str, timeout=120, **env):
    full_env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    return subprocess.run([sys.executable, "-c", script], env=full_env, capture_output=True, text=True,
                          timeout=timeout)


_CHILD_CONV = (
    "import warnings, torch, fastconv\n"
    "from fastconv import autotune\n"
    "autotune.MIN_MACS = 0\n"
    "autotune.oversubscribed = lambda: False\n"  # writes the file however loaded the machine is
    f"x = torch.randn{X_SHAPE!r}.double(); w = torch.randn({K}, {X_SHAPE[1]}, 3, 3).double()\n"
    "with warnings.catch_warnings(record=True) as rec:\n"
    "    warnings.simplefilter('always')\n"
    "    fastconv.functional.conv2d(x, w, padding=1)\n"
    "    fastconv.clear_autotune_cache(disk=False)\n"
    "    fastconv.functional.conv2d(x, w, padding=1)\n"
    "    fastconv.clear_autotune_cache()\n"
    "print(sum('unusable' in str(r.message) for r in rec))\n"
)


def test_fifo_in_place_of_the_file_does_not_hang(isolated_cache):
    isolated_cache.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(isolated_cache)
    proc = _run_child(_CHILD_CONV, FASTCONV_CACHE_DIR=str(isolated_cache.parent))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == "1", "expected exactly one warning"
    assert isolated_cache.is_file() and not isolated_cache.is_fifo()
    assert len(list(isolated_cache.parent.glob(f"{autotune.FILE_NAME}.corrupt-*"))) == 1


def test_folder_in_place_of_the_file_is_set_aside(isolated_cache, measured):
    isolated_cache.mkdir(parents=True)
    x, w = _data()
    with pytest.warns(RuntimeWarning, match="not a regular file"):
        F.conv2d(x, w, padding=1)
    assert isolated_cache.is_file() and len(_rows(isolated_cache)) == 1


def test_unreadable_file_is_set_aside(isolated_cache, measured):
    if os.geteuid() == 0:
        pytest.skip("running as root: file permissions do not stop reads")
    isolated_cache.parent.mkdir(parents=True, exist_ok=True)
    isolated_cache.write_bytes(b"")
    isolated_cache.chmod(0)
    x, w = _data()
    with pytest.warns(RuntimeWarning, match="unusable"):
        F.conv2d(x, w, padding=1)
    assert len(_rows(isolated_cache)) == 1


def test_unwritable_folder_keeps_choices_in_memory(tmp_path, monkeypatch, measured):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FASTCONV_CACHE_DIR", str(blocker / "sub"))  # a folder below a file: cannot exist
    fastconv.clear_autotune_cache(disk=False)
    x, w = _data()
    with pytest.warns(RuntimeWarning, match="in memory"):
        F.conv2d(x, w, padding=1)
    F.conv2d(x, w, padding=1)
    assert len(measured) == len(_candidates()) and len(fastconv.autotune_cache()) == 1


def test_concurrent_writers_lose_nothing(isolated_cache):
    """Four processes write 25 entries each at the same time: all 100 are in the file."""
    script = (
        "import sys, torch, fastconv\n"
        "from fastconv import autotune\n"
        "me = int(sys.argv[1])\n"
        "for i in range(25):\n"
        "    key = ((2, 1, me, i, 1, (1, 8, 8), (1, 3, 3), (1, 8, 8)), 'forward', 1)\n"
        "    autotune._write(key, autotune.Choice('direct', {'direct': 1.0, 'im2col': 2.0}, ('direct', 'im2col')))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               FASTCONV_CACHE_DIR=str(isolated_cache.parent))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], env=env, stderr=subprocess.PIPE, text=True)
             for i in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    rows = _rows(isolated_cache)
    assert len(rows) == 100
    assert len(fastconv.autotune_cache()) == 100


def test_size_is_capped_least_recently_used_first(isolated_cache, monkeypatch):
    monkeypatch.setenv("FASTCONV_AUTOTUNE_MAX_ENTRIES", "5")
    keys = [((2, 1, 4, i, 1, (1, 8, 8), (1, 3, 3), (1, 8, 8)), "forward", 1) for i in range(8)]
    choice = autotune.Choice("direct", {"direct": 1.0}, ("direct", "im2col"))
    for k in keys[:5]:
        autotune._write(k, choice)
    autotune._touch(keys[0])  # used again: it must outlive keys 1..3
    for k in keys[5:]:
        autotune._write(k, choice)
    stored = {json.loads(r["key"])[3] for r in _rows(isolated_cache)}
    assert stored == {0, 4, 5, 6, 7}


def test_batch_sizes_share_a_bucketed_entry(measured):
    names = _candidates()
    w = torch.randn(K, X_SHAPE[1], 3, 3, dtype=torch.float64)
    for batch in (5, 7, 8):  # all round up to 8
        x = torch.randn((batch,) + X_SHAPE[1:], dtype=torch.float64)
        assert_close(F.conv2d(x, w, padding=1), TF.conv2d(x, w, padding=1), what=f"batch {batch}")
    assert len(measured) == len(names) and len(fastconv.autotune_cache()) == 1
    assert [autotune.batch_bucket(b) for b in (0, 1, 2, 3, 5, 8, 9)] == [0, 1, 2, 4, 8, 8, 16]


def test_clear_forgets_memory_and_disk(isolated_cache, measured):
    names = _candidates()
    x, w = _data()
    F.conv2d(x, w, padding=1)
    assert isolated_cache.exists() and len(fastconv.autotune_cache()) == 1
    fastconv.clear_autotune_cache()
    assert _rows(isolated_cache) == []
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
    # the failure is not written: the file holds only finite times
    (row,) = _rows(isolated_cache_path())
    assert names[0] not in json.loads(row["times"])


def isolated_cache_path():
    return autotune.cache_path()


@pytest.mark.parametrize("bad", [RuntimeError("kernel exploded"), float("inf"), float("nan")])
def test_when_every_candidate_fails_nothing_is_stored(monkeypatch, isolated_cache, bad):
    tried = []

    def fails(alg, geom, pass_, inputs, best):
        tried.append(alg.name)
        if isinstance(bad, Exception):
            raise bad
        return bad

    monkeypatch.setattr(autotune, "_time_candidate", fails)
    x, w = _data()
    with pytest.warns(RuntimeWarning, match="failed"):
        y = F.conv2d(x, w, padding=1)
    assert_close(y, TF.conv2d(x, w, padding=1), what="forward")
    assert len(fastconv.autotune_cache()) == 0
    assert not isolated_cache.exists() or _rows(isolated_cache) == []
    assert registry.choose("auto", _geometry(), "forward").name == _heuristic_pick()
    F.conv2d(x, w, padding=1)
    assert len(tried) == len(_candidates()), "the failed tuning was repeated in the same process"


def test_registering_an_algorithm_invalidates_memoised_choices(monkeypatch, measured):
    names = _candidates()
    x, w = _data()
    F.conv2d(x, w, padding=1)
    base = registry._REGISTRY[(names[0], "numba")]
    extra = dataclasses.replace(base, name="zz-extra")
    monkeypatch.setitem(registry._REGISTRY, ("zz-extra", "numba"), extra)
    registry.register(extra)  # a new candidate: the stored choice was made without it
    try:
        F.conv2d(x, w, padding=1)
        assert len(measured) == 2 * len(names) + 1
        assert fastconv.autotune_cache()[_key()].candidates == tuple(names) + ("zz-extra",)
    finally:
        registry._REGISTRY.pop(("zz-extra", "numba"), None)


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


def test_tuning_leaves_global_random_states_untouched(measured):
    import numpy as np

    torch.manual_seed(1234)
    np.random.seed(1234)
    x, w = _data(requires_grad=True)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    y = F.conv2d(x, w, padding=1)  # tunes forward on an empty cache
    y.backward(torch.ones_like(y))  # and both gradients
    assert len(measured) == 3 * len(_candidates()), "the cache was not empty: nothing was tuned"
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert after[0] == numpy_state[0] and np.array_equal(after[1], numpy_state[1]) and after[2:] == numpy_state[2:]


def test_repetitions_fill_the_budget_and_take_the_median(monkeypatch):
    # a candidate with one slow run among fast ones: the median ignores it, and it is not dropped
    clock = {"t": 0.0}
    durations = iter([0.0] + [0.001] * 2 + [0.5] + [0.001] * 100)  # warm-up, then runs (seconds)

    def fake_run(*args):
        clock["t"] += next(durations)

    monkeypatch.setattr(autotune.time, "perf_counter", lambda: clock["t"])
    alg = registry.candidates(_geometry())[0]
    fake = type("Alg", (), {"forward": staticmethod(fake_run), "name": alg.name})()
    monkeypatch.setattr(autotune, "BUDGET_S", 0.6)
    ms = autotune._time_candidate(fake, _geometry(), "forward", (), best_ms=0.9)
    assert ms == pytest.approx(1.0)
    # more than MIN_REPS runs were taken while the budget lasted, despite the slow third run
    assert clock["t"] > 0.5


def test_hopeless_candidate_is_dropped_after_min_reps_only(monkeypatch):
    runs = []
    clock = {"t": 0.0}

    def slow(*args):
        runs.append(1)
        clock["t"] += 0.01

    monkeypatch.setattr(autotune.time, "perf_counter", lambda: clock["t"])
    fake = type("Alg", (), {"forward": staticmethod(slow), "name": "slow"})()
    autotune._time_candidate(fake, _geometry(), "forward", (), best_ms=1.0)
    assert len(runs) == 1 + autotune.MIN_REPS  # warm-up + MIN_REPS, then abandoned


def test_stored_choice_that_turns_out_slow_is_measured_again_once(monkeypatch, measured):
    names = _candidates()
    x, w = _data()
    F.conv2d(x, w, padding=1)
    assert len(measured) == len(names)
    key = _key()
    expected = fastconv.autotune_cache()[key].times_ms[fastconv.autotune_cache()[key].algo]
    slow_ms = autotune.SLOW_FACTOR * expected + autotune.SLOW_MIN_MS + 10
    # the first observed call of a process is never held against the choice
    for _ in range(1 + autotune.SLOW_STREAK):
        autotune._observe(key, slow_ms)
    F.conv2d(x, w, padding=1)
    assert len(measured) == 2 * len(names), "a choice observed slow was not measured again"
    for _ in range(5 * autotune.SLOW_STREAK):
        autotune._observe(key, slow_ms)
    F.conv2d(x, w, padding=1)
    assert len(measured) == 2 * len(names), "re-measured more than once in one process"


@pytest.mark.parametrize("speedup, stale", [(2.2, True), (1.3, False)])
def test_calls_twice_as_fast_as_stored_mark_the_choice_stale(speedup, stale):
    # ResNet-18's 512-channel 4x4 layer at batch 1: stored at 7.8 ms (measured under load), ran in 3.5;
    # a gap that large already says the race was run in the wrong conditions, one of 1.3x does not
    key = ("test-fast-rule", "forward", 2)
    autotune._watch[key] = watch = autotune._Watch(expected_ms=7.8)
    try:
        for _ in range(1 + autotune.SLOW_STREAK):  # the first call of a process is never counted
            autotune._observe(key, 7.8 / speedup)
        assert watch.stale is stale
    finally:
        del autotune._watch[key]


def test_stored_choice_far_faster_than_measured_is_measured_again_once(monkeypatch, measured):
    # a choice measured under load: every candidate's time inflated, the winner a coin toss; quiet calls then
    # run far below the stored time, which no longer says which candidate is fastest
    names = _candidates()
    x, w = _data()
    F.conv2d(x, w, padding=1)
    key = _key()
    choice = fastconv.autotune_cache()[key]
    inflated = {n: 100 * t + 10 * autotune.SLOW_MIN_MS for n, t in choice.times_ms.items()}
    autotune._memory[key] = autotune.Choice(choice.algo, inflated, choice.candidates)
    autotune._fast.clear()
    F.conv2d(x, w, padding=1)  # the lookup now watches against the inflated time (and this call counts)
    watch = autotune._watch[key]
    assert watch.expected_ms == inflated[choice.algo]
    watch.fast, watch.stale = 0, False
    fast_ms = choice.times_ms[choice.algo]
    for _ in range(autotune.SLOW_STREAK - 1):
        autotune._observe(key, fast_ms)
    assert not watch.stale, "marked for measuring before SLOW_STREAK fast calls"
    autotune._observe(key, fast_ms)
    assert watch.stale
    F.conv2d(x, w, padding=1)
    assert len(measured) == 2 * len(names), "a choice observed far faster than measured was not measured again"
    assert fastconv.autotune_cache()[key].times_ms[fastconv.autotune_cache()[key].algo] < inflated[choice.algo]
    for _ in range(5 * autotune.SLOW_STREAK):
        autotune._observe(key, fast_ms / 100)
    F.conv2d(x, w, padding=1)
    assert len(measured) == 2 * len(names), "re-measured more than once in one process"


def test_choice_made_on_an_oversubscribed_machine_is_kept_out_of_the_file(isolated_cache, monkeypatch, measured):
    monkeypatch.setattr(autotune, "oversubscribed", lambda: True)
    x, w = _data()
    F.conv2d(x, w, padding=1)
    assert _key() in fastconv.autotune_cache(), "this process must still use its choice"
    assert not isolated_cache.exists() or _rows(isolated_cache) == [], "a choice made under load was written"
    F.conv2d(x, w, padding=1)
    assert len(measured) == len(_candidates()), "measured again in the same process"
    # on a quiet machine the next measurement is written
    monkeypatch.setattr(autotune, "oversubscribed", lambda: False)
    fastconv.clear_autotune_cache(disk=False)
    F.conv2d(x, w, padding=1)
    assert len(measured) == 2 * len(_candidates())
    assert [r["pass"] for r in _rows(isolated_cache)] == ["forward"]


def test_oversubscribed_reads_the_load_average(monkeypatch):
    cores = os.cpu_count() or 1
    monkeypatch.setattr(autotune.os, "getloadavg", lambda: (cores + 1.0, 0.0, 0.0))
    assert OVERSUBSCRIBED()
    monkeypatch.setattr(autotune.os, "getloadavg", lambda: (cores + 0.5, 9.0, 9.0))
    assert not OVERSUBSCRIBED()

    def unreadable():
        raise OSError("no load average here")

    monkeypatch.setattr(autotune.os, "getloadavg", unreadable)
    assert not OVERSUBSCRIBED()


def test_observed_calls_reach_the_watch(measured):
    x, w = _data()
    F.conv2d(x, w, padding=1)
    F.conv2d(x, w, padding=1)
    F.conv2d(x, w, padding=1)
    assert autotune._watch[_key()].calls >= 2


def test_normal_calls_do_not_trigger_retuning(measured):
    names = _candidates()
    x, w = _data()
    for _ in range(10):
        F.conv2d(x, w, padding=1)
    watch = autotune._watch[_key()]
    for _ in range(10):
        autotune._observe(_key(), watch.expected_ms)  # as fast as measured
    F.conv2d(x, w, padding=1)
    assert len(measured) == len(names)


def test_deterministic_mode_uses_the_heuristic_and_ignores_stored_choices(monkeypatch, measured):
    names = _candidates()
    monkeypatch.setattr(autotune, "_time_candidate",
                        lambda alg, geom, pass_, inputs, best: 1.0 if alg.name != _heuristic_pick() else 2.0)
    x, w = _data()
    F.conv2d(x, w, padding=1)
    assert fastconv.autotune_cache()[_key()].algo != _heuristic_pick()
    for switch in ("api", "env", "torch"):
        with monkeypatch.context() as m:
            if switch == "api":
                fastconv.set_deterministic(True)
            elif switch == "env":
                m.setenv("FASTCONV_DETERMINISTIC", "1")
            else:
                m.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
            try:
                assert autotune.deterministic(), switch
                assert registry.choose("auto", _geometry(), "forward").name == _heuristic_pick()
            finally:
                fastconv.set_deterministic(None)
        assert not autotune.deterministic()
    assert registry.choose("auto", _geometry(), "forward").name != _heuristic_pick()
    fastconv.set_deterministic(False)
    try:
        monkeypatch.setenv("FASTCONV_DETERMINISTIC", "1")
        assert not autotune.deterministic(), "set_deterministic(False) beats the environment"
    finally:
        fastconv.set_deterministic(None)


def test_far_slower_candidate_is_dropped_after_one_timed_run(monkeypatch):
    # warm-up and first run both far beyond the best: MIN_REPS more runs would only cost tuning time
    runs = []
    clock = {"t": 0.0}

    def very_slow(*args):
        runs.append(1)
        clock["t"] += 0.05  # 50 ms against a best of 1 ms

    monkeypatch.setattr(autotune.time, "perf_counter", lambda: clock["t"])
    fake = type("Alg", (), {"forward": staticmethod(very_slow), "name": "very_slow"})()
    ms = autotune._time_candidate(fake, _geometry(), "forward", (), best_ms=1.0)
    assert len(runs) == 2 and ms == pytest.approx(50.0)  # warm-up + one timed run


def test_candidate_hundreds_of_times_slower_is_dropped_after_its_warm_up(monkeypatch):
    runs = []
    clock = {"t": 0.0}

    def hopeless(*args):
        runs.append(1)
        clock["t"] += 1.0  # 1 s against a best of 1 ms: far beyond any first-call loading cost

    monkeypatch.setattr(autotune.time, "perf_counter", lambda: clock["t"])
    fake = type("Alg", (), {"forward": staticmethod(hopeless), "name": "hopeless"})()
    assert autotune._time_candidate(fake, _geometry(), "forward", (), best_ms=1.0) == pytest.approx(1000.0)
    assert len(runs) == 1


# ---- the default CPU mode: tuning on the caller's real calls ----------------------------------------
@pytest.fixture
def online(monkeypatch):
    monkeypatch.setattr(autotune, "MODE", "online")
    ran = []
    real = autotune._Exploration.call

    def counting(self, *args):
        ran.append(self.current().name)
        return real(self, *args)

    monkeypatch.setattr(autotune._Exploration, "call", counting)
    return ran


def _calls_to_tune(n_candidates: int) -> int:
    # each: one warm-up call + up to MAX_TIMED_ROUNDS timed calls (MIN_REPS, more in a close race)
    return n_candidates * (1 + autotune.MAX_TIMED_ROUNDS)


def test_online_first_call_runs_the_heuristic_pick_and_measures_nothing_else(online, measured):
    x, w = _data()
    assert_close(F.conv2d(x, w, padding=1), TF.conv2d(x, w, padding=1))
    with autotune.enabled(False):
        heuristic = registry.choose("auto", _geometry(), "forward").name
    assert online == [heuristic]
    assert measured == []  # no synthetic measurement
    assert _key() not in fastconv.autotune_cache()  # nothing decided yet


def test_online_tuning_stores_the_fastest_after_every_candidate_ran_on_real_calls(online, measured, isolated_cache,
                                                                                  monkeypatch):
    # Re-validation off (the watch tests cover it): a choice stored while another test process kept the other core
    # busy read three later calls as "faster than stored" once (CI, two test processes) and was measured again.
    monkeypatch.setattr(autotune, "SLOW_STREAK", 1 << 30)
    names = _candidates()
    x, w = _data()
    ref = TF.conv2d(x, w, padding=1)
    for _ in range(_calls_to_tune(len(names))):
        assert_close(F.conv2d(x, w, padding=1), ref)  # every call is the caller's correct result
    choice = fastconv.autotune_cache()[_key()]
    assert set(choice.times_ms) == set(names) and set(online) == set(names)
    assert choice.algo == min(choice.times_ms, key=choice.times_ms.get)
    assert measured == []
    assert [r["algo"] for r in _rows(isolated_cache)] == [choice.algo]  # written to disk too
    # later calls run the winner without exploring
    before = len(online)
    F.conv2d(x, w, padding=1)
    assert len(online) == before


def _timed_fakes(monkeypatch, true_ms: dict, busy_calls=range(0)):
    """Two or more candidates of ``_geometry()`` whose forward takes ``true_ms[name]`` on a fake clock,
    twice that during the calls numbered in ``busy_calls`` (1-based); returns them and the call log."""
    clock = {"t": 0.0}
    log = []
    algs = []
    for alg in registry.candidates(_geometry())[:len(true_ms)]:
        ms = list(true_ms.values())[len(algs)]

        def run(*args, _name=alg.name, _ms=ms):
            log.append(_name)
            clock["t"] += _ms * (2.0 if len(log) in busy_calls else 1.0) / 1e3
            return _name
        algs.append(dataclasses.replace(alg, forward=run))
    monkeypatch.setattr(autotune.time, "perf_counter", lambda: clock["t"])
    return algs, log


def _explore(algs, calls_max=100):
    ex = autotune._Exploration(_key(), ("memo",), "forward", algs, algs[0].name)
    autotune._exploring[_key()] = ex
    for _ in range(calls_max):
        if ex.done:
            break
        ex.call()
    assert ex.done, "the race never ended"
    return ex


def test_online_candidates_take_turns_so_a_busy_spell_slows_them_alike(monkeypatch):
    # A is truly faster (0.9 vs 1.0 ms). Calls 3-6 run at half speed: in blocks (A's warm-up and three runs,
    # then B's) A's runs would all fall in the busy spell and B would win; taking turns, both see it.
    algs, log = _timed_fakes(monkeypatch, {"A": 0.9, "B": 1.0}, busy_calls=range(3, 7))
    a, b = (alg.name for alg in algs)
    ex = _explore(algs)
    assert log[:2 * (1 + autotune.MIN_REPS)] == [a, b] * (1 + autotune.MIN_REPS)  # warm-up round + timed rounds
    assert fastconv.autotune_cache()[_key()].algo == a


def test_online_close_race_runs_on_and_a_clear_one_stops_after_min_reps(monkeypatch):
    algs, log = _timed_fakes(monkeypatch, {"A": 1.0, "B": 1.5})  # B 50% slower: decided after MIN_REPS rounds
    ex = _explore(algs)
    assert len(log) == 2 * (1 + autotune.MIN_REPS) and ex.times[algs[0].name] == pytest.approx(1.0)
    algs, log = _timed_fakes(monkeypatch, {"A": 1.0, "B": 1.05})  # within CLOSE_FACTOR: more rounds
    ex = _explore(algs)
    assert len(log) == 2 * (1 + autotune.MAX_TIMED_ROUNDS)
    assert fastconv.autotune_cache()[_key()].algo == algs[0].name


def test_online_tuning_leaves_global_random_state_alone(online):
    x, w = _data()
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    for _ in range(_calls_to_tune(len(_candidates()))):
        F.conv2d(x, w, padding=1)
    assert _key() in fastconv.autotune_cache()
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert after[0] == numpy_state[0] and np.array_equal(after[1], numpy_state[1])


def test_online_candidate_that_raises_is_dropped_and_the_call_still_answers(online, monkeypatch):
    names = _candidates()
    with autotune.enabled(False):
        heuristic = registry.choose("auto", _geometry(), "forward").name
    victim = next(n for n in names if n != heuristic)
    real = registry.candidates

    def broken(geom):
        out = []
        for alg in real(geom):
            if alg.name == victim:
                def boom(*args):
                    raise RuntimeError("planted failure")
                alg = dataclasses.replace(alg, forward=boom)
            out.append(alg)
        return out

    monkeypatch.setattr(registry, "candidates", broken)
    x, w = _data()
    ref = TF.conv2d(x, w, padding=1)
    for _ in range(_calls_to_tune(len(names))):
        assert_close(F.conv2d(x, w, padding=1), ref)
    choice = fastconv.autotune_cache()[_key()]
    assert choice.algo != victim and choice.times_ms[victim] == float("inf")


def test_decide_reports_the_stored_choice_for_any_batch_of_its_bucket_and_never_measures(measured):
    # registry.decide is what the counter, the benchmark and info read: the op's own stored choice, found
    # under the bucketed key (batch 5 is stored as 8; the counter once looked it up unbucketed and missed)
    x = torch.randn((5,) + X_SHAPE[1:], dtype=torch.float64)
    w = torch.randn(K, X_SHAPE[1], 3, 3, dtype=torch.float64)
    F.conv2d(x, w, padding=1)
    geom5 = make_geometry(2, 5, X_SHAPE[1], K, 1, X_SHAPE[2:], (3, 3), None, [1, 1], [1, 1], [1, 1], [1, 1],
                          torch.float64, backends.current())
    stored = fastconv.autotune_cache()[autotune.cache_key(geom5, "forward")]
    count = len(measured)
    d = registry.decide("auto", geom5, "forward")
    assert d.name == stored.algo and d.reason.startswith("autotuned here"), d
    assert d.workspace_bytes == d.algorithm.workspace_bytes(geom5)
    untuned = registry.decide("auto", _geometry(), "forward")  # batch 2: a bucket of its own, not tuned
    assert untuned.reason.startswith("heuristic"), untuned
    assert len(measured) == count  # deciding measured nothing


def test_autotune_mode_from_the_environment_is_checked(monkeypatch):
    monkeypatch.setenv("FASTCONV_AUTOTUNE_MODE", "Measure ")
    assert autotune._mode_from_env() == "measure"
    monkeypatch.setenv("FASTCONV_AUTOTUNE_MODE", "fastest")
    with pytest.warns(RuntimeWarning, match="FASTCONV_AUTOTUNE_MODE='fastest' is not one of online, measure"):
        assert autotune._mode_from_env() == "online"


def test_slowdown_every_key_shares_is_load_not_a_bad_choice(monkeypatch, measured):
    # another process on the cores slows every layer alike: the watched key is no slower than the others, so it
    # is not measured again (racing its slow candidates under that load would only add to it); a key slower than
    # the others by SLOW_FACTOR still is
    names = _candidates()
    x, w = _data()
    F.conv2d(x, w, padding=1)
    key = _key()
    expected = fastconv.autotune_cache()[key].times_ms[fastconv.autotune_cache()[key].algo]
    slow_ms = autotune.SLOW_FACTOR * expected + autotune.SLOW_MIN_MS + 10
    others = [("other", i) for i in range(autotune.RECENT_MIN_OTHERS)]
    for other in others:
        autotune._recent.append((other, slow_ms / expected))  # every other layer as slowed
    watch = autotune._watch[key]
    for _ in range(1 + 3 * autotune.SLOW_STREAK):
        autotune._observe(key, slow_ms)
    assert not watch.stale, "a slowdown all keys share was taken for a slow choice"
    F.conv2d(x, w, padding=1)
    assert len(measured) == len(names), "measured again under load"
    # the other layers back to their stored times: the same slow calls now mark the key
    for other in others * 4:
        autotune._recent.append((other, 1.0))
    for _ in range(autotune.SLOW_STREAK):
        autotune._observe(key, slow_ms)
    assert watch.stale, "a key slower than the rest of the machine was not marked for measuring"
    F.conv2d(x, w, padding=1)
    assert len(measured) == 2 * len(names)
