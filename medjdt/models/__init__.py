"""Networks and the Lightning module: :class:`SegmentationModule`, :func:`build_network`,
:func:`load_teacher`, :class:`SemiSupervisedModule`; the callbacks that write a run's files:
:class:`EvaluationTables`, :class:`NiftiPredictionWriter`, :class:`LastCheckpoint`, :class:`StopOnSignal`."""

from medjdt.models.evaluation_tables import EvaluationTables
from medjdt.models.last_checkpoint import LastCheckpoint
from medjdt.models.module import SegmentationModule
from medjdt.models.networks import build_network, deep_supervision_heads, network_channels
from medjdt.models.prediction_writer import NiftiPredictionWriter
from medjdt.models.semi import MeanTeacherSpec, SemiSupervisedModule
from medjdt.models.stop_on_signal import StopOnSignal
from medjdt.models.teacher import TeacherSpec, load_teacher

__all__ = [
    "SegmentationModule",
    "SemiSupervisedModule",
    "MeanTeacherSpec",
    "build_network",
    "deep_supervision_heads",
    "network_channels",
    "NiftiPredictionWriter",
    "EvaluationTables",
    "TeacherSpec",
    "load_teacher",
    "LastCheckpoint",
    "StopOnSignal",
]
