"""The shared argument checks: each accepts what it promises, refuses the rest, and says what, where and why."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from medjdt.validation import (
    check_choice,
    check_number,
    check_path,
    check_probability,
    check_tensor,
    did_you_mean,
)


@pytest.mark.parametrize("value", [0, 1, 2.5, np.float32(3.0), np.int64(7)])
def test_number_accepts_finite_numbers_and_returns_float(value):
    out = check_number("x", value, low=0)
    assert isinstance(out, float) and out == float(value)


@pytest.mark.parametrize("value", [True, False, "1", None, [1], math.nan, math.inf, -math.inf])
def test_number_refuses_what_is_not_a_finite_number(value):
    with pytest.raises(ValueError, match=r"^x must be a finite number, got "):
        check_number("x", value)


def test_number_bounds_and_their_wording():
    assert check_number("a", 0, low=0) == 0.0
    with pytest.raises(ValueError, match=r"^a must be a finite number > 0, got 0$"):
        check_number("a", 0, low=0, low_inclusive=False)
    with pytest.raises(ValueError, match=r"^a must be a finite number <= 1, got 1.5$"):
        check_number("a", 1.5, high=1)
    with pytest.raises(ValueError, match=r"^d must be a finite number in \[0, 1\), got 1$"):
        check_number("d", 1, low=0, high=1, high_inclusive=False)
    assert check_number("d", 0.999, low=0, high=1, high_inclusive=False) == 0.999


def test_number_integer_mode():
    assert check_number("n", 3.0, integer=True, low=1) == 3
    assert isinstance(check_number("n", np.int32(3), integer=True), int)
    with pytest.raises(ValueError, match=r"^n must be a finite integer >= 1, got 3.5$"):
        check_number("n", 3.5, integer=True, low=1)
    with pytest.raises(ValueError, match=r"^n must be a finite integer >= 1, got 0$"):
        check_number("n", 0, integer=True, low=1)


def test_where_prefixes_the_message():
    with pytest.raises(ValueError, match=r"^JDTLoss: alpha must be a finite number >= 0, got -1$"):
        check_number("alpha", -1, low=0, where="JDTLoss")


@pytest.mark.parametrize("value", [0, 0.5, 1, np.float64(0.25)])
def test_probability_accepts_the_unit_interval(value):
    assert check_probability("p", value) == float(value)


@pytest.mark.parametrize("value", [-0.01, 1.01, math.nan, "0.5"])
def test_probability_refuses_outside(value):
    with pytest.raises(ValueError, match=r"^p must be a finite number in \[0, 1\], got "):
        check_probability("p", value)


def test_choice_returns_the_choice_and_suggests_the_closest():
    assert check_choice("mode", "image", ("dataset", "image", "class")) == "image"
    with pytest.raises(ValueError) as error:
        check_choice("mode", "datset", ("dataset", "image", "class"), where="JDTLoss")
    assert str(error.value) == (
        "JDTLoss: mode must be one of 'dataset', 'image', 'class', got 'datset' (did you mean dataset?)"
    )
    with pytest.raises(ValueError, match=r"got 'zzz'$"):
        check_choice("mode", "zzz", ("dataset", "image"))


def test_choice_does_not_take_a_bool_for_an_int():
    assert check_choice("k", 1, (0, 1)) == 1
    with pytest.raises(ValueError, match="got True"):
        check_choice("k", True, (0, 1))
    assert check_choice("flag", True, (True, False)) is True


def test_did_you_mean():
    assert did_you_mean("softmx", ["softmax", "sigmoid"]) == " (did you mean softmax?)"
    assert did_you_mean("xyz", ["softmax", "sigmoid"]) == ""


def test_path_exists_kind_and_absence(tmp_path):
    folder, file = tmp_path / "d", tmp_path / "f.txt"
    folder.mkdir()
    file.write_text("x")
    assert check_path("manifest", str(file), kind="file") == file
    assert check_path("out", folder, kind="dir") == folder
    with pytest.raises(ValueError, match=rf"^manifest {tmp_path}/missing.csv does not exist$"):
        check_path("manifest", tmp_path / "missing.csv")
    with pytest.raises(ValueError, match=r"must be a file, but it is a folder$"):
        check_path("manifest", folder, kind="file")
    with pytest.raises(ValueError, match=r"must be a folder, but it is a file$"):
        check_path("--out", file, kind="dir")
    with pytest.raises(ValueError, match=r"exists already$"):
        check_path("--out", file, exists=False)
    assert check_path("--out", tmp_path / "new", exists=False) == tmp_path / "new"
    with pytest.raises(ValueError, match=r"^x must be a path, got ''$"):
        check_path("x", "")


def test_path_writable(tmp_path):
    file = tmp_path / "f.txt"
    file.write_text("x")
    assert check_path("--out", tmp_path / "a" / "b", exists=None, writable=True) == tmp_path / "a" / "b"
    with pytest.raises(ValueError, match=r"cannot be created: .*f.txt is a file$"):
        check_path("--out", file / "sub", exists=None, writable=True)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="is not writable"):
            check_path("--out", locked / "x", exists=None, writable=True)


def test_tensor_checks():
    x = torch.zeros(2, 3, 4, 4)
    assert check_tensor("probs", x, ndim=(4, 5), shape=(2, None, 4, 4), floating=True, finite=True) is x
    with pytest.raises(ValueError, match=r"^probs must be a torch.Tensor, got ndarray$"):
        check_tensor("probs", np.zeros(3))
    with pytest.raises(ValueError, match=r"^probs must have 4 or 5 dims, got shape \(2, 3\)$"):
        check_tensor("probs", torch.zeros(2, 3), ndim=(4, 5))
    with pytest.raises(ValueError, match=r"^mask must have shape \(2, \*, 4\), got shape \(2, 3, 5\)$"):
        check_tensor("mask", torch.zeros(2, 3, 5), shape=(2, None, 4))
    with pytest.raises(ValueError, match=r"must be a floating point tensor, got dtype torch.int64$"):
        check_tensor("probs", torch.zeros(2, dtype=torch.long), floating=True)
    with pytest.raises(ValueError, match=r"must be an integer tensor, got dtype torch.float32$"):
        check_tensor("labels", torch.zeros(2), floating=False)
    y = torch.zeros(3)
    y[1] = math.nan
    with pytest.raises(ValueError, match=r"^Net: logits has 1 NaN or infinite entries \(shape \(3,\)\)$"):
        check_tensor("logits", y, finite=True, where="Net")


def test_module_imports_no_heavy_library():
    code = "import sys, medjdt.validation; print(any(m in sys.modules for m in ('torch', 'numpy', 'pandas')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
