"""Run artifacts: versioned schemas, the run folder and its append-only metrics log (docs/outputs.md). No torch."""

from verl_gq.eval.artifacts.run_dir import (
    MetricsLog,
    MetricsLogError,
    RunDir,
    deploy_evaluation,
    record_deploy_evaluation,
    source_commit,
)
from verl_gq.eval.artifacts.schema import (
    BandBounds,
    CosStats,
    DeployEval,
    EvalBlock,
    EvalRow,
    ModeStats,
    ResumeRow,
    RouterEval,
    RouterStep,
    SchemaError,
    TrainRow,
)

__all__ = [
    "BandBounds", "CosStats", "DeployEval", "EvalBlock", "EvalRow", "MetricsLog", "MetricsLogError", "ModeStats",
    "ResumeRow", "RouterEval", "RouterStep", "RunDir", "SchemaError", "TrainRow", "deploy_evaluation",
    "record_deploy_evaluation", "source_commit",
]
