"""The Triton kernels compile for a real GPU (sm_90, the H100/H200) without register spills.

The interpreter tests (test_fused_triton.py, test_fused_metrics_triton.py) check what the kernels compute; they
do not compile them. Here Triton's own compiler and the ptxas it ships build the CUDA binaries on any machine,
GPU or not, and ``cuobjdump`` (also shipped with Triton) reads their register and local-memory use: local
memory means spilled registers, which would turn these memory-bound passes into much slower ones. The
compilation runs in a subprocess without ``TRITON_INTERPRET`` (the test session sets it for the interpreter
tests, and it decides at import how the kernels are built). Skipped when Triton (optional) or its CUDA tools are
missing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from itertools import product
from pathlib import Path

import pytest

LOSS_POINTERS = {"logits_ptr": "*fp32", "target_ptr": "*fp32", "mask_ptr": "*u8"}
LOSS_SIZES = {"n_voxels": "i32", "channels": "i32", "batch": "i32"}
# (activation code, hard labels, p = 2, logits dtype)
LOSS_CASES = list(product([0, 1, 2], [False, True], [False, True], ["fp32", "bf16"]))
# (soft reference, number of thresholds, classes)
METRIC_CASES = list(product([False, True], [0, 9], [3, 8]))


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resources(kernel, signature: dict, constants: dict, num_warps: int) -> dict[str, int]:
    """Registers per thread and local memory (bytes) of ``kernel`` compiled for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**signature, **{name: "constexpr" for name in constants}}
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constants),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps},
    )
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        report = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
    return {key: int(value) for key, value in re.findall(r"\b(REG|LOCAL):(\d+)", report)}


def _measure_all() -> dict[str, dict[str, int]]:
    """Resources of every kernel variant under test, keyed by a readable name."""
    import triton

    import medjdt.losses.fused_triton as loss_launch
    import medjdt.metrics.fused_triton as metric_launch
    from medjdt.losses import _triton_kernels as loss_kernels
    from medjdt.metrics._triton_kernels import voxel_sums_kernel

    out = {}
    for activation, hard, p2, dtype in LOSS_CASES:
        pointers = {**LOSS_POINTERS, "logits_ptr": f"*{dtype}", "target_ptr": "*i64" if hard else "*fp32"}
        constants = {"ACTIVATION": activation, "HARD": hard, "HAS_MASK": True, "P2": p2, "PRODUCT": not hard,
                     "C_PAD": 4, "BLOCK": loss_launch._BLOCK}
        name = f"loss-{activation}-{hard}-{p2}-{dtype}"
        out[f"{name}-forward"] = _resources(
            loss_kernels.forward_kernel, {**pointers, "sums_ptr": "*fp32", **LOSS_SIZES}, constants,
            loss_launch._NUM_WARPS,
        )
        out[f"{name}-backward"] = _resources(
            loss_kernels.backward_kernel, {**pointers, "grad_sums_ptr": "*fp32", "grad_ptr": f"*{dtype}", **LOSS_SIZES},
            constants, loss_launch._NUM_WARPS,
        )
    for soft, thresholds, channels in METRIC_CASES:
        signature = {
            "probs_ptr": "*fp32", "target_ptr": "*fp32" if soft else "*i64", "mask_ptr": "*u8",
            "thresholds_ptr": "*fp32", "top_ptr": "*fp64", "classwise_ptr": "*fp64", "image_ptr": "*fp64",
            "confusion_ptr": "*fp64", "masses_ptr": "*fp64", "levels_ptr": "*fp64",
            "n_voxels": "i32", "batch": "i32", "n_bins": "i32", "eps": "fp32",
        }
        levels = thresholds + 1
        constants = {
            "C": channels, "SOFT": soft, "HAS_MASK": True, "CALIBRATION": True, "OVERLAP": True,
            "N_THR": thresholds, "C_PAD": triton.next_power_of_2(channels), "M_PAD": 16,
            "CC_PAD": triton.next_power_of_2(channels**2), "LL_PAD": triton.next_power_of_2(levels * levels),
            "BLOCK": metric_launch._BLOCK, "ITERS": metric_launch._ITERS,
        }
        out[f"metrics-{soft}-{thresholds}-{channels}"] = _resources(
            voxel_sums_kernel, signature, constants, metric_launch._NUM_WARPS
        )
    return out


@pytest.fixture(scope="module")
def resources() -> dict[str, dict[str, int]]:
    pytest.importorskip("triton", reason="triton is not installed (optional dependency: pip install triton)")
    if not os.path.isfile(_cuobjdump()):
        pytest.skip("Triton's CUDA tools (cuobjdump) are not shipped with this build")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("activation", "hard", "p2", "dtype"), LOSS_CASES)
def test_loss_kernels_compile_without_spills(resources, activation, hard, p2, dtype):
    for direction in ("forward", "backward"):
        used = resources[f"loss-{activation}-{hard}-{p2}-{dtype}-{direction}"]
        assert used["LOCAL"] == 0, (direction, used)
        # at most 64 registers per thread: 4 programs of 8 warps per SM (half occupancy) for these streaming passes
        assert used["REG"] <= 64, (direction, used)


@pytest.mark.parametrize(("soft", "thresholds", "channels"), METRIC_CASES)
def test_metric_kernel_compiles_without_spills(resources, soft, thresholds, channels):
    used = resources[f"metrics-{soft}-{thresholds}-{channels}"]
    assert used["LOCAL"] == 0, used


if __name__ == "__main__":  # the subprocess of the fixture above
    print(json.dumps(_measure_all()))
