"""Writing a plan: ``plan.yaml`` (the LightningCLI config, trains as it is) and ``plan.md`` (every setting with its
reason, and the fingerprint summary). Both are written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medjdt.data.atomic import atomic_write_text
from medjdt.planning.fingerprint import CSV_NAME, JSON_NAME, Fingerprint
from medjdt.planning.plan import Plan

__all__ = ["plan_markdown", "plan_yaml", "write_plan"]


def plan_yaml(plan: Plan, fp: Fingerprint) -> str:
    """The config as YAML, lists of numbers on one line, with a header saying where it came from."""
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    def represent_list(dumper: yaml.SafeDumper, value: list) -> Any:
        flat = all(not isinstance(v, dict) for v in value)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flat)

    _Dumper.add_representer(list, represent_list)
    body = yaml.dump(plan.config, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)
    s = fp.summary
    header = (
        f"# Planned by medjdt plan from the fingerprint of {s['cases']} case(s) of\n#   {s['manifest']}\n"
        "# plan.md beside this file gives the reason for every value. Train it as it is:\n"
        "#   medjdt fit --config plan.yaml\n"
    )
    return header + body


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return str(text).replace("|", "\\|").replace("\n", " ")


def _stat(entry: dict[str, float] | None, fmt: str = "{:.3g}") -> str:
    if not entry:
        return "n/a"
    return f"{fmt.format(entry['median'])} [{fmt.format(entry['min'])}, {fmt.format(entry['max'])}]"


def _axes(values: list[float], fmt: str = "{:.3g}") -> str:
    return " x ".join(fmt.format(v) for v in values)


def plan_markdown(plan: Plan, fp: Fingerprint) -> str:
    """plan.md: the settings table (setting, value, reason) and the fingerprint summary."""
    s = fp.summary
    lines = [
        "# Training plan",
        "",
        f"Manifest `{s['manifest']}`: {s['cases']} case(s), {s['labelled_cases']} labelled, modality "
        f"{s['modality']}, {s['spatial_dims']}D, {s['num_classes']} classes {s['class_names']}.",
        "",
        "Train it with `medjdt fit --config plan.yaml`. Axes are in RAS order (after `data.orientation: RAS`).",
        "",
        "| setting | value | reason |",
        "| --- | --- | --- |",
    ]
    lines += [f"| `{d.setting}` | {_cell(d.value)} | {_cell(d.reason)} |" for d in plan.decisions]
    raters = s.get("raters")
    lines += [
        "",
        "## Fingerprint",
        "",
        f"From `{CSV_NAME}` (one row per case) and `{JSON_NAME}` (this summary); median [min, max] over the cases.",
        "",
        "| property | value |",
        "| --- | --- |",
        f"| cases (labelled) | {s['cases']} ({s['labelled_cases']}) |",
        f"| folds | {s['folds']} |",
        f"| raters per case | {_stat(raters, '{:g}')} |",
        f"| stored orientations | {', '.join(f'{k}: {v}' for k, v in s['orientations'].items())} |",
        f"| spacing (mm), median | {_axes(s['spacing_mm']['median'])} |",
        f"| spacing (mm), 10th percentile | {_axes(s['spacing_mm']['p10'])} |",
        f"| spacing (mm), min / max | {_axes(s['spacing_mm']['min'])} / {_axes(s['spacing_mm']['max'])} |",
        f"| shape (voxels), median | {_axes(s['shape']['median'], '{:.0f}')} |",
        f"| shape (voxels), min / max | {_axes(s['shape']['min'], '{:.0f}')} / {_axes(s['shape']['max'], '{:.0f}')} |",
    ]
    for name, entry in s["sizes"].items():
        lines.append(f"| {name} ({s['size_unit']}, mean of the raters) | {_stat(entry)} |")
    for k, stats in enumerate(s["intensity"]):
        channel = "" if len(s["intensity"]) == 1 else f" channel {k}"
        for key in ("p0.5", "p50", "p99.5", "mean", "std"):
            lines.append(f"| foreground intensity{channel} {key} | {_stat(stats.get(key))} |")
    if plan.fit is not None:
        lines += [
            "",
            f"Estimated training memory: {plan.fit.memory_gib:.2f} GiB "
            f"({plan.fit.patches} patches of {list(plan.fit.patch)} per step).",
        ]
    return "\n".join(lines) + "\n"


def write_plan(plan: Plan, fp: Fingerprint, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``out/plan.yaml`` and ``out/plan.md`` atomically; returns their paths."""
    out = Path(out)
    yaml_path = atomic_write_text(out / "plan.yaml", plan_yaml(plan, fp))
    md_path = atomic_write_text(out / "plan.md", plan_markdown(plan, fp))
    return yaml_path, md_path
