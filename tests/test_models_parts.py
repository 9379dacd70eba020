"""Network factory, specs, schedules, deep-supervision plumbing and the evaluation tables callback."""

import math

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from monai.networks.nets import DynUNet, SegResNet, UNet
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader

from medjdt.models import EvaluationTables, SegmentationModule
from medjdt.models.networks import build_network, deep_supervision_heads, network_channels
from medjdt.models.schedules import adamw_with_schedule, lr_factor
from medjdt.models.specs import instantiate

UNET3D = {
    "class_path": "monai.networks.nets.UNet",
    "init_args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8], "strides": [2]},
}


@pytest.mark.parametrize(
    ("spec", "cls", "shape"),
    [
        (UNET3D, UNet, (1, 1, 16, 16, 16)),
        ({"class_path": "UNet", "init_args": {**UNET3D["init_args"], "spatial_dims": 2}}, UNet, (1, 1, 16, 16)),
        (
            {"class_path": "SegResNet", "init_args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                                                      "init_filters": 8}},
            SegResNet,
            (1, 1, 16, 16, 16),
        ),
        (
            {"class_path": "DynUNet", "init_args": {"spatial_dims": 2, "in_channels": 1, "out_channels": 3,
                                                    "kernel_size": [3, 3, 3], "strides": [1, 2, 2],
                                                    "upsample_kernel_size": [2, 2]}},
            DynUNet,
            (1, 1, 16, 16),
        ),
    ],
)
def test_build_network_full_and_short_names(spec, cls, shape):
    net = build_network(spec)
    assert isinstance(net, cls)
    out = net(torch.randn(shape))
    assert out.shape == (shape[0], 3, *shape[2:])
    assert network_channels(spec)[:2] == (1, 3)


def test_unknown_network_and_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown network 'NoSuchNet'"):
        build_network({"class_path": "NoSuchNet", "init_args": {}})
    with pytest.raises(ValueError, match="not a torch.nn.modules.module.Module subclass"):
        build_network({"class_path": "collections.OrderedDict"})
    with pytest.raises(ValueError, match="cannot build network"):
        build_network({"class_path": "UNet", "init_args": {"spatial_dims": 3, "bogus": 1}})
    with pytest.raises(ValueError, match="unknown keys"):
        build_network({"class_path": "UNet", "args": {}})
    with pytest.raises(ValueError, match="must set"):
        network_channels({"class_path": "SegResNet", "init_args": {"spatial_dims": 3}})


def test_instantiate_spec_with_arguments():
    lin = instantiate({"class_path": "torch.nn.Linear", "init_args": {"in_features": 2, "out_features": 5}},
                      torch.nn.Module, "layer")
    assert isinstance(lin, torch.nn.Linear) and lin.out_features == 5


def test_dynunet_deep_supervision_heads_are_raw_low_resolution_outputs():
    net = DynUNet(3, 1, 3, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                  deep_supervision=True, deep_supr_num=1).train()
    x = torch.randn(2, 1, 16, 16, 16)
    out = net(x)
    logits, heads = deep_supervision_heads(net, out)
    assert logits.shape == (2, 3, 16, 16, 16)
    assert [tuple(h.shape) for h in heads] == [(2, 3, 8, 8, 8)]
    # MONAI's stacked output holds the same head, only nearest-upsampled: the raw head is what it came from.
    upsampled = torch.nn.functional.interpolate(heads[0], size=(16, 16, 16), mode="nearest")
    torch.testing.assert_close(out[:, 1], upsampled)
    net.eval()
    with torch.no_grad():
        plain = net(x)
    assert deep_supervision_heads(net, plain)[1] == []


def test_lr_schedule_warmup_then_decay():
    total, warm = 100, 10
    factors = [lr_factor(s, total, warm, "poly") for s in range(total)]
    assert all(a < b for a, b in zip(factors[:warm], factors[1:warm + 1]))  # strictly rising during warm-up
    assert factors[warm] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[warm:], factors[warm + 1:]))  # non-increasing afterwards
    assert lr_factor(total, total, warm, "poly") == 0.0
    mid = warm + (total - warm) // 2
    assert lr_factor(mid, total, warm, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(mid, total, warm, "poly") == pytest.approx(0.5**0.9)
    assert lr_factor(50, total, 0, "constant") == 1.0
    with pytest.raises(ValueError, match="lr_factor: schedule must be one of 'poly', 'cosine', 'constant', got 'lin"):
        lr_factor(0, 10, 0, "linear")


def test_adamw_with_schedule_warms_up_over_the_run_and_needs_a_finite_run_for_a_schedule():
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = adamw_with_schedule(params, lr=0.1, weight_decay=0.0, warmup_fraction=0.1, schedule="cosine", total_steps=50)
    scheduler = opt["lr_scheduler"]["scheduler"]
    assert opt["lr_scheduler"]["interval"] == "step"
    assert opt["optimizer"].param_groups[0]["lr"] == pytest.approx(0.1 * lr_factor(0, 50, 5, "cosine"))
    for _ in range(5):
        opt["optimizer"].step()
        scheduler.step()
    assert opt["optimizer"].param_groups[0]["lr"] == pytest.approx(0.1)  # warm-up done after 10% of 50 steps
    with pytest.raises(ValueError, match="need a finite training length"):
        adamw_with_schedule(params, lr=0.1, weight_decay=0.0, warmup_fraction=0.0, schedule="poly",
                            total_steps=float("inf"))
    constant = adamw_with_schedule(params, lr=0.1, weight_decay=0.0, warmup_fraction=0.0, schedule="constant",
                                   total_steps=float("inf"))
    assert constant["optimizer"].param_groups[0]["lr"] == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------------ EvaluationTables
NET_2D = {"class_path": "UNet", "init_args": {"spatial_dims": 2, "in_channels": 1, "out_channels": 3,
                                              "channels": [4, 8], "strides": [2], "num_res_units": 0}}


def _eval_batches(n: int = 3) -> DataLoader:
    """Whole-volume batches as the data module gives them (batch size 1, one case each)."""
    generator = torch.Generator().manual_seed(0)
    batches = [
        {
            "image": torch.randn(1, 1, 16, 16, generator=generator),
            "raters": torch.randint(0, 3, (1, 2, 16, 16), generator=generator),
            "case_id": [f"case{i}"],
        }
        for i in reversed(range(n))
    ]
    return DataLoader(batches, batch_size=None)


def _trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, logger=CSVLogger(tmp_path, name="run"), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kwargs,
    )


def test_evaluation_tables_write_the_per_case_and_reliability_csvs_of_validate_and_test(tmp_path):
    torch.manual_seed(0)
    module = SegmentationModule(network=NET_2D, roi_size=[8, 8], class_names=["background", "organ", "lesion"])
    batches = _eval_batches()
    trainer = _trainer(tmp_path, [EvaluationTables()])
    trainer.validate(module, dataloaders=batches)
    folder = trainer.log_dir
    per_case = pd.read_csv(f"{folder}/val_per_case.csv")
    assert list(per_case["case_id"]) == ["case0", "case1", "case2"]  # one row per case, sorted
    for column in ("n_voxels", "dice", "iou", "absent_fp_voxels", "soft_dice", "thresholded_dice", "ece",
                   "ece_classwise", "brier", "nll", "ece_majority", "brier_majority", "nll_majority", "dice/organ",
                   "soft_dice/lesion"):
        assert column in per_case.columns, column
    # the same values as the module's metric objects, which hold the evaluation until the next one begins
    majority = module.evaluation_metrics("val")["majority"].per_case().set_index("case_id")
    mean = module.evaluation_metrics("val")["mean"].per_case().set_index("case_id")
    pd.testing.assert_series_equal(per_case.set_index("case_id")["dice"], majority["dice"], check_names=False)
    pd.testing.assert_series_equal(per_case.set_index("case_id")["ece_majority"], majority["ece"], check_names=False)
    pd.testing.assert_series_equal(per_case.set_index("case_id")["ece"], mean["ece"], check_names=False)
    reliability = pd.read_csv(f"{folder}/val_reliability.csv")
    pd.testing.assert_frame_equal(reliability, module.evaluation_metrics("val")["mean"].reliability(),
                                  check_dtype=False)
    assert per_case["dice"].mean() == pytest.approx(float(trainer.callback_metrics["val/dice"]), rel=1e-5)
    trainer.test(module, dataloaders=_eval_batches(2))
    test_cases = pd.read_csv(f"{folder}/test_per_case.csv")
    assert list(test_cases["case_id"]) == ["case0", "case1"]
    assert (tmp_path / "run" / "version_0" / "test_reliability.csv").is_file()


def test_evaluation_tables_skip_the_sanity_check_and_without_the_callback_nothing_is_written(tmp_path):
    torch.manual_seed(0)
    module = SegmentationModule(network=NET_2D, roi_size=[8, 8])
    seen_after_sanity = []

    class Probe(pl.Callback):
        def on_sanity_check_end(self, trainer, pl_module):
            seen_after_sanity.append(sorted(p.name for p in tmp_path.rglob("*.csv")))

    train = DataLoader([{"image": torch.randn(2, 1, 8, 8), "label": torch.softmax(torch.randn(2, 3, 8, 8), 1)}],
                       batch_size=None)
    trainer = _trainer(tmp_path / "with", [EvaluationTables(), Probe()], max_epochs=1, num_sanity_val_steps=1)
    trainer.fit(module, train_dataloaders=train, val_dataloaders=_eval_batches(2))
    assert seen_after_sanity == [[]]
    assert len(pd.read_csv(f"{trainer.log_dir}/val_per_case.csv")) == 2  # the real validation: both cases
    plain = _trainer(tmp_path / "without", [])
    plain.validate(module, dataloaders=_eval_batches(2))
    assert not list((tmp_path / "without").rglob("*_per_case.csv"))  # the module itself writes no file
    other = _trainer(tmp_path / "other", [EvaluationTables()])
    with pytest.raises(ValueError, match="EvaluationTables needs a model with evaluation_metrics"):
        other.validate(_OtherModule(), dataloaders=DataLoader([torch.zeros(1)]))


class _OtherModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def validation_step(self, batch, batch_idx):
        return None
