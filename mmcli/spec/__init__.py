"""Run specs: pydantic models for every section of a spec YAML, and ``load_spec``.

Every field carries a docstring; they are the user's reference (the README links here). Unknown
keys are rejected everywhere so that a typo never silently falls back to a default.

One module per concern: :mod:`~mmcli.spec.base` (the :class:`Section` base and loading),
:mod:`~mmcli.spec.common` (sections shared by several run kinds), :mod:`~mmcli.spec.fusion`
(fusion encoder and graph), :mod:`~mmcli.spec.pretrain`, :mod:`~mmcli.spec.fuse` and
:mod:`~mmcli.spec.evaluate` (one per command), :mod:`~mmcli.spec.kinds` (spec kind by file name or keys).
Import from ``mmcli.spec``; every public name is re-exported here.
"""

from mmcli.spec.base import (
    MAX_SPEC_VALUES,
    Section,
    apply_overrides,
    load_spec,
    load_yaml_text,
    parse_override,
    read_yaml,
    validate,
)
from mmcli.spec.common import ModelSpec, OutputSpec, SourceSpec, TrainSpec, check_arch_name, command_url, url_scheme
from mmcli.spec.evaluate import (
    EVAL_TASKS,
    AlignmentEvalTaskSpec,
    CaptioningTaskSpec,
    EvalSpec,
    FusionEvalTaskSpec,
    LabelledSourceSpec,
    LinearProbeTaskSpec,
    MlmEvalTaskSpec,
    RetrievalTaskSpec,
    ZeroShotTaskSpec,
)
from mmcli.spec.fuse import FuseDataSpec, FuseSpec, GeneratorSpec
from mmcli.spec.fusion import FusionSpec, GraphSpec
from mmcli.spec.kinds import SPEC_KINDS, check_kind, kind_of, load_spec_of_kind, spec_model_for
from mmcli.spec.pretrain import (
    ClipObjectiveSpec,
    DataSpec,
    ItmObjectiveSpec,
    MimObjectiveSpec,
    MlmObjectiveSpec,
    MmlmObjectiveSpec,
    Objectives,
    PretrainSpec,
)

__all__ = [
    # base
    "MAX_SPEC_VALUES",
    "Section",
    "apply_overrides",
    "load_spec",
    "load_yaml_text",
    "parse_override",
    "read_yaml",
    "validate",
    # common
    "ModelSpec",
    "OutputSpec",
    "SourceSpec",
    "TrainSpec",
    "check_arch_name",
    "command_url",
    "url_scheme",
    # fusion
    "FusionSpec",
    "GraphSpec",
    # pretrain
    "ClipObjectiveSpec",
    "DataSpec",
    "ItmObjectiveSpec",
    "MimObjectiveSpec",
    "MlmObjectiveSpec",
    "MmlmObjectiveSpec",
    "Objectives",
    "PretrainSpec",
    # fuse
    "FuseDataSpec",
    "FuseSpec",
    "GeneratorSpec",
    # evaluate
    "EVAL_TASKS",
    "AlignmentEvalTaskSpec",
    "EvalSpec",
    "FusionEvalTaskSpec",
    "LabelledSourceSpec",
    "LinearProbeTaskSpec",
    "MlmEvalTaskSpec",
    "RetrievalTaskSpec",
    "CaptioningTaskSpec",
    "ZeroShotTaskSpec",
    # kinds
    "SPEC_KINDS",
    "check_kind",
    "kind_of",
    "load_spec_of_kind",
    "spec_model_for",
]
