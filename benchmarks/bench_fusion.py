"""Rater fusion speed: medjdt.labels.fuse vs straightforward MONAI / SimpleITK equivalents, in one process.

For R raters of an S^3 volume (default 7 x 256^3, uint8 labels) prints the median time (ms) of
``fuse`` for ``mean``, ``weighted``, ``majority`` and ``random``, the time of a reference doing the same
job, and the ratio medjdt / reference:

- mean: MONAI ``one_hot`` of the whole stack, averaged over raters;
- weighted: MONAI ``one_hot`` of the whole stack, weighted sum with the same weights (given, not computed);
- majority: SimpleITK ``LabelVoting`` (label map only, no one-hot);
- random: MONAI ``one_hot`` of one rater.

``--input-dtype float32`` feeds label maps as MONAI's ``LoadImaged`` produces them by default, ``int64`` as
after ``CastToTyped(dtype=torch.long)``. ``--threads 1`` matches a data-loader worker.

    python benchmarks/bench_fusion.py [--raters 7] [--size 256] [--classes 2] [--repeats 5] [--threads N]
                                      [--input-dtype uint8|int64|float32] [--no-reference]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import SimpleITK as sitk
import torch
from monai.networks.utils import one_hot

from medjdt.labels import fuse
from medjdt.labels.fusion import dice_weights


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raters", type=int, default=7)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--input-dtype", choices=["uint8", "int64", "float32"], default="uint8")
    parser.add_argument("--no-reference", action="store_true", help="time medjdt only")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    shape = (args.raters, args.size, args.size, args.size)
    stack = torch.randint(0, args.classes, shape, generator=generator, dtype=torch.uint8)
    raters = stack.to(getattr(torch, args.input_dtype))
    weights = dice_weights(stack, args.classes)
    print(
        f"{args.raters} raters x {args.size}^3, {args.classes} classes, {raters.dtype} input, "
        f"{torch.get_num_threads()} torch threads, median of {args.repeats}"
    )

    def reference_one_hot(labels: torch.Tensor) -> torch.Tensor:
        return one_hot(labels.unsqueeze(1).long(), args.classes, dim=1)  # (R, C, *spatial) float32

    images = [sitk.GetImageFromArray(m) for m in stack.numpy()]
    cases: list[tuple[str, Callable[[], object], str, Callable[[], object]]] = [
        (
            "mean",
            lambda: fuse(raters, "mean", args.classes),
            "MONAI one_hot + mean",
            lambda: reference_one_hot(stack).mean(0),
        ),
        (
            "weighted",
            lambda: fuse(raters, "weighted", args.classes),
            "MONAI one_hot + weighted sum",
            lambda: torch.einsum("r,rc...->c...", weights.float(), reference_one_hot(stack)),
        ),
        (
            "majority",
            lambda: fuse(raters, "majority", args.classes),
            "SimpleITK LabelVoting",
            lambda: sitk.LabelVoting(images, 0),
        ),
        (
            "random",
            lambda: fuse(raters, "random", args.classes, generator=generator),
            "MONAI one_hot of one rater",
            lambda: reference_one_hot(stack[:1])[0],
        ),
    ]
    print(f"{'method':<10}{'medjdt ms':>11}  {'reference':<30}{'ref ms':>9}{'ratio':>8}")
    for name, ours, reference_name, reference in cases:
        ours_ms = _median_ms(ours, args.repeats)
        if args.no_reference:
            print(f"{name:<10}{ours_ms:>11.1f}")
            continue
        reference_ms = _median_ms(reference, args.repeats)
        print(f"{name:<10}{ours_ms:>11.1f}  {reference_name:<30}{reference_ms:>9.1f}{ours_ms / reference_ms:>8.2f}")


if __name__ == "__main__":
    main()
