"""Data: manifests, public dataset layouts, synthetic multi-rater phantoms, loading, caching and the DataModule.

Data flow: dataset on disk -> :func:`build_manifest` (one row per case x rater) -> :func:`read_manifest`
-> :func:`load_case` (image + every rater on one checked grid) -> :func:`preprocess_case` (orientation,
spacing, intensity; cached on disk by :class:`PreprocessedCases`) -> :class:`SegmentationDataModule`
(patches, joint augmentation, rater fusion: per patch, or for STAPLE once per whole case, cached on disk by
:class:`CaseFusedTargets`).
"""

from __future__ import annotations

from medjdt._lazy import lazy_exports

# Public name -> defining module. Resolved on first access so that the command line, which imports
# medjdt.data.commands, does not pay for importing MONAI and Lightning.
_EXPORTS = {
    "CaseCache": "medjdt.data.cache",
    "PreprocessedCases": "medjdt.data.cache",
    "CASE_FUSION_METHODS": "medjdt.data.case_fusion",
    "CaseFusedTargets": "medjdt.data.case_fusion",
    "SegmentationDataModule": "medjdt.data.datamodule",
    "ensure_demo_data": "medjdt.data.demo",
    "AFFINE_ATOL_MM": "medjdt.data.io",
    "LabelMapReader": "medjdt.data.io",
    "load_case": "medjdt.data.io",
    "read_image": "medjdt.data.io",
    "read_label_map": "medjdt.data.io",
    "write_nifti": "medjdt.data.io",
    "LAYOUTS": "medjdt.data.layouts",
    "build_manifest": "medjdt.data.layouts",
    "scan_layout": "medjdt.data.layouts",
    "CaseRecord": "medjdt.data.manifest",
    "Manifest": "medjdt.data.manifest",
    "assign_folds": "medjdt.data.manifest",
    "read_manifest": "medjdt.data.manifest",
    "write_manifest": "medjdt.data.manifest",
    "make_phantom_dataset": "medjdt.data.phantoms",
    "PreprocessSettings": "medjdt.data.preprocess",
    "preprocess_case": "medjdt.data.preprocess",
    "restore_original_grid": "medjdt.data.preprocess",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports("medjdt.data", _EXPORTS, globals())
