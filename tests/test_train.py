"""``fastconv train``: LeNet-5 of fastconv layers learns scikit-learn's digits.

The full demo (20 epochs, >= 97% test accuracy) is run by hand for the report; here a short run must clear a
threshold far above chance (10%) and below what 5-epoch runs reach (measured 93.8-95.8% test, 94.5-95.8%
train over seeds 0-2), so the test fails if learning breaks (wrong gradients, a broken layer) but not on
rounding differences.
"""
from __future__ import annotations

import torch

from fastconv.commands import train


def test_digits_are_upsampled_to_lenet_input_and_split_stratified():
    x_train, y_train, x_test, y_test = train.load_digits_32(seed=0)
    assert x_train.shape[1:] == (1, 32, 32) and x_test.shape[1:] == (1, 32, 32)
    assert len(y_train) + len(y_test) == 1797 and len(y_test) == 450  # 25% of 1797, rounded up
    assert 0.0 <= float(x_train.min()) and float(x_train.max()) <= 1.0
    # stratified: every class appears in the test set in proportion (about 45 each)
    counts = torch.bincount(y_test, minlength=10)
    assert int(counts.min()) >= 40 and int(counts.max()) <= 50


def test_short_training_run_learns():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what `fastconv train` uses (see fastconv/commands/train.py)
    try:
        result = train.train_lenet_digits(epochs=5, seed=0, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert result["accuracy"] >= 0.90, result
    assert result["train_accuracy"] >= 0.90, result


def test_cli_passes_options_and_prints_accuracy_and_time(monkeypatch, capsys):
    from fastconv.cli import main

    calls = []

    def fake_train(epochs, seed, batch_size, lr, progress):
        calls.append((epochs, seed, batch_size, lr, progress, torch.get_num_threads()))
        return dict(accuracy=0.975, train_accuracy=0.99, seconds=12.34, epochs=epochs, test_size=450,
                    train_size=1347)

    threads = torch.get_num_threads()
    monkeypatch.setattr(train, "train_lenet_digits", fake_train)
    try:
        assert main(["train", "--epochs", "7", "--seed", "3", "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert calls == [(7, 3, 32, 2e-3, False, 1)]
    out = capsys.readouterr().out
    assert "test accuracy 97.50%" in out and "time 12.3 s" in out and "7 epochs" in out


def test_random_shift_translates_each_image_with_zero_fill():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).reshape(2, 1, 5, 5) + 1
    g = torch.Generator().manual_seed(0)
    assert torch.equal(train.random_shift(x, 0, g), x)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    shifted = train.random_shift(x, 2, g1)
    offsets = torch.randint(0, 5, (2, 2), generator=g2)  # the same draws: offsets 0..4 mean shifts -2..2
    for i, (dy, dx) in enumerate(offsets.tolist()):
        sy, sx = 2 - dy, 2 - dx  # content moves down/right by (sy, sx)
        expected = torch.zeros(1, 5, 5)
        src = x[i, :, max(0, -sy):5 - max(0, sy), max(0, -sx):5 - max(0, sx)]
        expected[:, max(0, sy):5 - max(0, -sy), max(0, sx):5 - max(0, -sx)] = src
        assert torch.equal(shifted[i], expected), (i, dy, dx)
