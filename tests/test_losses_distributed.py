"""Two CPU processes (gloo), each with half of a batch, against one process with the whole batch.

Convention under test (JDTLoss docstring): with the dataset aggregation every rank returns the full-batch loss,
and the gradient on each rank's own logits is ``world_size`` times the full-batch gradient of those logits, so
that DDP's averaging of parameter gradients gives exactly the full-batch parameter gradient.
"""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from medjdt.losses import DiceSemimetricLoss, JaccardMetricLoss, SegmentationLoss

WORLD_SIZE = 2
BATCH = 4


def _data():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(BATCH, 3, 6, 5, 4, generator=generator, dtype=torch.float64)
    soft = torch.softmax(2 * torch.randn(BATCH, 3, 6, 5, 4, generator=generator, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 3, (BATCH, 6, 5, 4), generator=generator)
    labels[:2] = labels[:2].clamp(max=1)  # class 2 only occurs on the second rank's half
    mask = torch.rand(BATCH, 6, 5, 4, generator=generator) > 0.3
    image = torch.randn(BATCH, 2, 6, 5, 4, generator=generator, dtype=torch.float64)
    return logits, soft, labels, mask, image


def _model():
    torch.manual_seed(1)
    return torch.nn.Conv3d(2, 3, kernel_size=1).double()


def _losses():
    return {
        "jml_soft": (JaccardMetricLoss(), "soft"),
        "dml_hard_present": (DiceSemimetricLoss(active_classes="present"), "labels"),
    }


def _loss_and_grad(loss_fn, logits, target, mask):
    logits = logits.clone().requires_grad_()
    loss = loss_fn(logits, target, mask)
    loss.backward()
    return loss.detach(), logits.grad


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)  # two processes share the machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        logits, soft, labels, mask, image = _data()
        half = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
        targets = {"soft": soft[half], "labels": labels[half]}
        results = {}
        for name, (loss_fn, kind) in _losses().items():
            results[name] = _loss_and_grad(loss_fn, logits[half], targets[kind], mask[half])
        unsynced = JaccardMetricLoss(sync_ranks=False)
        results["unsynced"] = _loss_and_grad(unsynced, logits[half], soft[half], mask[half])

        model = DistributedDataParallel(_model())
        total, _ = SegmentationLoss()(model(image[half]), labels[half])
        total.backward()
        results["ddp"] = (total.detach(), [p.grad for p in model.parameters()])
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    logits, soft, labels, mask, image = _data()
    targets = {"soft": soft, "labels": labels}

    for name, (loss_fn, kind) in _losses().items():
        full_loss, full_grad = _loss_and_grad(loss_fn, logits, targets[kind], mask)
        for rank in ranks:
            torch.testing.assert_close(rank[name][0], full_loss, rtol=1e-12, atol=0)
        rank_grads = torch.cat([rank[name][1] for rank in ranks])
        torch.testing.assert_close(rank_grads / WORLD_SIZE, full_grad, rtol=1e-10, atol=1e-14)

    # without the sync each rank optimises its own shard's metric, which differs from the full-batch one
    full_loss, _ = _loss_and_grad(JaccardMetricLoss(), logits, soft, mask)
    assert all(abs(rank["unsynced"][0].item() - full_loss.item()) > 1e-4 for rank in ranks)

    model = _model()
    total, _ = SegmentationLoss()(model(image), labels)
    total.backward()
    for rank in ranks:
        for ddp_grad, param in zip(rank["ddp"][1], model.parameters()):
            torch.testing.assert_close(ddp_grad, param.grad, rtol=1e-10, atol=1e-14)
