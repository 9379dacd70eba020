"""Renamed loss arguments: ``reduction`` -> ``aggregation`` and ``threshold`` -> ``presence_threshold``.

The old names keep working for one release: they warn (``FutureWarning`` naming the class or function that was
called) and give the same loss as the new names; giving both names is a ``ValueError``; a YAML config that still
says the old key loads through jsonargparse, as LightningCLI reads ``model.jdt``.
"""

from pathlib import Path

import pytest
import torch
import yaml

from medjdt.losses import DiceSemimetricLoss, JaccardMetricLoss, JDTLoss, jdt_loss

ROOT = Path(__file__).resolve().parents[1]


def _inputs():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 5, generator=generator)
    soft = torch.softmax(3 * torch.randn(2, 3, 6, 5, generator=generator), dim=1)
    soft[:, 2] *= 0.1  # class 2 stays below a presence threshold of 0.2 in some images
    soft[:, 0] = 1 - soft[:, 1:].sum(1)
    return logits, soft


def _future_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, FutureWarning)]


@pytest.mark.parametrize("cls", [JDTLoss, JaccardMetricLoss, DiceSemimetricLoss], ids=lambda c: c.__name__)
def test_old_names_warn_once_naming_the_class_and_give_the_same_loss(cls):
    logits, soft = _inputs()
    with pytest.warns(FutureWarning) as record:
        old = cls(reduction="image", threshold=0.2, active_classes="present")
    assert _future_warnings(record) == [
        f"{cls.__name__}: argument 'reduction' is deprecated; use 'aggregation'",
        f"{cls.__name__}: argument 'threshold' is deprecated; use 'presence_threshold'",
    ]
    assert all(Path(w.filename) == Path(__file__) for w in record)  # points at the line that built the loss
    new = cls(aggregation="image", presence_threshold=0.2, active_classes="present")
    assert (old.aggregation, old.presence_threshold) == (new.aggregation, new.presence_threshold)
    assert old(logits, soft).item() == new(logits, soft).item()
    assert new(logits, soft).item() != cls(active_classes="present")(logits, soft).item()  # the settings matter


def test_old_weights_dict_is_accepted_too():
    logits, soft = _inputs()
    weights = {"dataset": 0.3, "class": 0.7}
    with pytest.warns(FutureWarning, match="JDTLoss: argument 'reduction' is deprecated; use 'aggregation'"):
        old = JDTLoss(reduction=weights)
    assert old(logits, soft).item() == JDTLoss(aggregation=weights)(logits, soft).item()


def test_functional_jdt_loss_warns_naming_itself():
    _, soft = _inputs()
    probs = torch.softmax(_inputs()[0], dim=1)
    with pytest.warns(FutureWarning) as record:
        old = jdt_loss(probs, soft, reduction="class", threshold=0.2, active_classes="present")
    assert _future_warnings(record) == [
        "jdt_loss: argument 'reduction' is deprecated; use 'aggregation'",
        "jdt_loss: argument 'threshold' is deprecated; use 'presence_threshold'",
    ]
    assert all(Path(w.filename) == Path(__file__) for w in record)
    new = jdt_loss(probs, soft, aggregation="class", presence_threshold=0.2, active_classes="present")
    assert old.item() == new.item()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"aggregation": "image", "reduction": "class"}, "'reduction' is the deprecated name of 'aggregation'"),
        ({"presence_threshold": 0.2, "threshold": 0.3}, "'threshold' is the deprecated name of 'presence_threshold'"),
    ],
)
def test_old_and_new_name_together_is_an_error(kwargs, message):
    with pytest.raises(ValueError, match=f"^DiceSemimetricLoss: argument {message}"):
        DiceSemimetricLoss(**kwargs)
    with pytest.raises(ValueError, match=f"^jdt_loss: argument {message}"):
        jdt_loss(*_inputs(), **kwargs)
    # for the class a new name left at its default cannot be told from one not given; jdt_loss sees the keywords
    default = {"aggregation": "dataset", "presence_threshold": 0.01}
    same_as_default = {key: default.get(key, value) for key, value in kwargs.items()}
    with pytest.raises(ValueError, match=f"^jdt_loss: argument {message}"):
        jdt_loss(*_inputs(), **same_as_default)


def test_yaml_config_with_the_old_key_still_loads():
    """``model.jdt`` of configs/demo.yaml with the old keys, parsed and built by jsonargparse (what LightningCLI
    does with ``SegmentationModule(jdt: torch.nn.Module | None)``)."""
    from jsonargparse import ArgumentParser

    jdt = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["model"]["jdt"]
    jdt["init_args"] = {"reduction": "image", "threshold": 0.2, "active_classes": "present"}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--jdt", type=torch.nn.Module | None)
    config = parser.parse_string(yaml.safe_dump({"jdt": jdt}))
    with pytest.warns(FutureWarning) as record:
        loss = parser.instantiate(config).jdt
    assert type(loss).__name__ == jdt["class_path"].rpartition(".")[2]
    assert _future_warnings(record) == [
        f"{type(loss).__name__}: argument 'reduction' is deprecated; use 'aggregation'",
        f"{type(loss).__name__}: argument 'threshold' is deprecated; use 'presence_threshold'",
    ]
    assert (loss.aggregation, loss.presence_threshold, loss.active_classes) == ({"image": 1.0}, 0.2, "present")


def test_yaml_config_with_both_keys_is_an_error():
    from jsonargparse import ArgumentParser

    jdt = {"class_path": "medjdt.losses.JaccardMetricLoss", "init_args": {"aggregation": "class", "reduction": "image"}}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--jdt", type=torch.nn.Module | None)
    config = parser.parse_string(yaml.safe_dump({"jdt": jdt}))
    with pytest.raises(ValueError, match="JaccardMetricLoss: argument 'reduction' is the deprecated name"):
        parser.instantiate(config)


def test_loss_spec_saved_before_the_rename_still_builds():
    """A checkpoint written before the rename holds every init arg of the loss under its old name."""
    from medjdt.models.specs import instantiate

    old_init_args = {
        "variant": 1, "reduction": "class", "active_classes": "present", "threshold": 0.2, "smooth": 1.0, "p": 1.0,
        "log_loss": False, "gamma": 1.0, "class_weights": None, "ignore_index": None, "include_background": True,
        "activation": "softmax", "sync_ranks": True, "fused": True,
    }  # fmt: skip
    spec = {"class_path": "medjdt.losses.DiceSemimetricLoss", "init_args": old_init_args}
    with pytest.warns(FutureWarning, match="DiceSemimetricLoss: argument 'reduction' is deprecated"):
        loss = instantiate(spec, torch.nn.Module, "jdt loss")
    logits, soft = _inputs()
    expected = DiceSemimetricLoss(aggregation="class", presence_threshold=0.2, active_classes="present")
    assert loss(logits, soft).item() == expected(logits, soft).item()
