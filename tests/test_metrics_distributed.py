"""Two gloo processes give the same metrics as one process, also with a case split across ranks in chunks."""

import warnings

import pandas as pd
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medjdt.metrics import CalibrationMetrics, OverlapMetrics, SegmentationMetrics

CASES = ["case_a", "case_b", "case_c"]


def _case(index):
    """Probabilities (1, 3, 6, 6, 8), hard labels (1, 6, 6, 8) and mask of one case, deterministic."""
    g = torch.Generator().manual_seed(index)
    probs = (torch.randn(1, 3, 6, 6, 8, generator=g) * 2).softmax(1)
    labels = torch.randint(0, 3, (1, 6, 6, 8), generator=g)
    mask = torch.rand(1, 6, 6, 8, generator=g) < 0.8
    return probs, labels, mask


def _chunk(tensors, part):
    """First (part 0) or second (part 1) half of the last axis."""
    return tuple(t[..., :5] if part == 0 else t[..., 5:] for t in tensors)


def _metrics():
    return (
        CalibrationMetrics(num_classes=3),
        OverlapMetrics(num_classes=3, worst_percent=(10, 50)),
        SegmentationMetrics(num_classes=3, worst_percent=(10, 50)),
    )


def _results(metrics):
    out = {}
    for index, metric in enumerate(metrics):
        out.update({f"{index}:{key}": value.item() for key, value in metric.compute().items()})
    tables = [metric.per_case() for metric in metrics]
    bins = [metrics[0].reliability(), metrics[2].reliability()]
    return out, tables, bins


def _worker(rank, world_size, init_file, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        # Split: rank 0 has case_a and the first chunk of case_b; rank 1 the second chunk of case_b and case_c.
        split = _metrics()
        work = {0: [(0, None), (1, 0)], 1: [(1, 1), (2, None)]}[rank]
        for index, part in work:
            data = _case(index) if part is None else _chunk(_case(index), part)
            for metric in split:
                metric.update(data[0], data[1], [CASES[index]], data[2])
        # Uneven: rank 1 sees no data at all.
        uneven = _metrics()
        if rank == 0:
            for index in range(3):
                probs, labels, mask = _case(index)
                for metric in uneven:
                    metric.update(probs, labels, [CASES[index]], mask)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # compute before update on rank 1
            results = {"split": _results(split), "uneven": _results(uneven)}
        torch.save(results, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_single_process(tmp_path):
    init_file, result_file = tmp_path / "init", tmp_path / "result"
    mp.spawn(_worker, args=(2, str(init_file), str(result_file)), nprocs=2, join=True)

    single = _metrics()
    for index in range(3):
        probs, labels, mask = _case(index)
        for metric in single:
            metric.update(probs, labels, [CASES[index]], mask)
    expected_values, expected_tables, expected_bins = _results(single)

    for rank in range(2):
        results = torch.load(f"{result_file}.{rank}", weights_only=False)
        for scenario in ("split", "uneven"):
            values, tables, bins = results[scenario]
            assert values.keys() == expected_values.keys()
            for key, value in expected_values.items():
                assert abs(values[key] - value) <= 1e-9 + 1e-6 * abs(value), (rank, scenario, key)
            for table, expected_table in zip(tables, expected_tables):
                assert list(table["case_id"]) == CASES
                pd.testing.assert_frame_equal(table, expected_table, rtol=1e-6)
            for frame, expected_frame in zip(bins, expected_bins):
                pd.testing.assert_frame_equal(frame, expected_frame, rtol=1e-6)
