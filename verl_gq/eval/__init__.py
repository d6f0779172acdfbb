"""Run artifacts: versioned schemas, the run folder and its append-only metrics log (docs/outputs.md).

The writers the training engine uses are exported here; the readers behind the report (collect, stats, tables,
figures) are imported from their modules, so a trainer never imports matplotlib.
"""

from verl_gq.eval.run_dir import MetricsLog, MetricsLogError, RunDir, record_deploy_evaluation, source_commit
from verl_gq.eval.schema import (
    Band,
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
    "Band", "CosStats", "DeployEval", "EvalBlock", "EvalRow", "MetricsLog", "MetricsLogError", "ModeStats",
    "ResumeRow", "RouterEval", "RouterStep", "RunDir", "SchemaError", "TrainRow", "record_deploy_evaluation",
    "source_commit",
]
