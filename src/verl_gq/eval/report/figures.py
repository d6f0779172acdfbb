"""Figures from collected runs, each written as a PNG together with the exact numbers it plots (CSV).

- training curves: hack and solve over training per arm, as trained (train rows, knob on) and deployed (eval
  rows, knob off); the line is the mean over seeds and the band mean ± SEM where at least 2 seeds have the step.
  A single-seed arm is drawn dashed, without a band, and labelled "(1 seed)".
- long run: every run of the chosen arms drawn on its own (no averaging), over its whole length.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training or CI machines
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from verl_gq.eval.report.collect import RunSet  # noqa: E402

# (source, frame attribute of Run, column prefix): what each panel column of the figures reads.
SOURCES = (("as_trained", "train", "as_trained.overall"), ("deployed", "evals", "deployed.overall"))
METRICS = ("hack", "solve")


def run_series(runset: RunSet, arms: Sequence[str]) -> pd.DataFrame:
    """One row per (run, source, metric, step): the raw values the figures are built from."""
    parts = []
    for arm in arms:
        for run in runset.arms[arm]:
            for source, attr, prefix in SOURCES:
                frame = getattr(run, attr)
                for metric in METRICS:
                    parts.append(pd.DataFrame({"run": run.name, "arm": arm, "seed": run.seed, "source": source,
                                               "metric": metric, "step": frame["step"].to_numpy(),
                                               "value": frame[f"{prefix}.{metric}"].to_numpy(dtype=float)}))
    return pd.concat(parts, ignore_index=True)


def seed_band(series: pd.DataFrame) -> pd.DataFrame:
    """Per (arm, source, metric, step): number of seeds, mean, SEM (None below 2 seeds), min and max."""
    grouped = series.groupby(["arm", "source", "metric", "step"])["value"]
    band = grouped.agg(n_seeds="count", mean="mean", min="min", max="max").reset_index()
    band["sem"] = grouped.agg(lambda v: v.std(ddof=1) / np.sqrt(len(v)) if len(v) >= 2 else np.nan).to_numpy()
    return band[["arm", "source", "metric", "step", "n_seeds", "mean", "sem", "min", "max"]]


def _grid(title: str) -> tuple[plt.Figure, np.ndarray]:
    fig, axes = plt.subplots(len(METRICS), len(SOURCES), figsize=(11, 7), sharex=True, squeeze=False)
    for i, metric in enumerate(METRICS):
        for j, (source, _, _) in enumerate(SOURCES):
            ax = axes[i, j]
            ax.set_title(f"{metric} rate, {source.replace('_', ' ')} ({'knob on' if j == 0 else 'knob off'})")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
            if i == len(METRICS) - 1:
                ax.set_xlabel("training step")
    fig.suptitle(title)
    return fig, axes


def plot_training_curves(band: pd.DataFrame, n_seeds_by_arm: dict[str, int], path: Path) -> None:
    """Mean over seeds per arm with a ± SEM band; single-seed arms dashed without band."""
    fig, axes = _grid("Hack and solve over training (mean ± SEM over seeds)")
    colours = plt.get_cmap("tab10")
    for k, (arm, n_seeds) in enumerate(n_seeds_by_arm.items()):
        label = f"{arm} ({n_seeds} seed{'s' if n_seeds != 1 else ''})"
        for i, metric in enumerate(METRICS):
            for j, (source, _, _) in enumerate(SOURCES):
                part = band[(band.arm == arm) & (band.source == source) & (band.metric == metric)]
                ax = axes[i, j]
                ax.plot(part["step"], part["mean"], color=colours(k % 10), linestyle="--" if n_seeds == 1 else "-",
                        marker="o" if source == "deployed" else None, markersize=3,
                        label=label if (i, j) == (0, 0) else None)
                ok = part["n_seeds"] >= 2
                ax.fill_between(part["step"][ok], (part["mean"] - part["sem"])[ok], (part["mean"] + part["sem"])[ok],
                                color=colours(k % 10), alpha=0.2, linewidth=0)
    fig.legend(loc="lower center", ncol=min(len(n_seeds_by_arm), 5), frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_long_run(series: pd.DataFrame, path: Path) -> None:
    """One line per run, coloured by arm."""
    fig, axes = _grid("Long runs (each run on its own)")
    colours = plt.get_cmap("tab10")
    arms = list(dict.fromkeys(series["arm"]))
    for run, part_run in series.groupby("run", sort=True):
        arm = part_run["arm"].iloc[0]
        colour = colours(arms.index(arm) % 10)
        for i, metric in enumerate(METRICS):
            for j, (source, _, _) in enumerate(SOURCES):
                part = part_run[(part_run.source == source) & (part_run.metric == metric)]
                axes[i, j].plot(part["step"], part["value"], color=colour, linewidth=1,
                                marker="o" if source == "deployed" else None, markersize=2,
                                label=f"{run} ({arm})" if (i, j) == (0, 0) else None)
    fig.legend(loc="lower center", ncol=4, frameon=False, fontsize="small")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def training_curves(runset: RunSet, out_dir: Path) -> tuple[Path, Path]:
    """training_curves.png and training_curves.csv (the band numbers plotted)."""
    arms = list(runset.arms)
    band = seed_band(run_series(runset, arms))
    png, csv = out_dir / "training_curves.png", out_dir / "training_curves.csv"
    band.to_csv(csv, index=False)
    plot_training_curves(band, {arm: len(runset.arms[arm]) for arm in arms}, png)
    return png, csv


def long_run(runset: RunSet, arms: Sequence[str], out_dir: Path) -> tuple[Path, Path]:
    """long_run.png and long_run.csv (every plotted point, per run)."""
    unknown = [a for a in arms if a not in runset.arms]
    if unknown:
        raise ValueError(f"long-run arms {unknown} have no complete runs; arms with runs: {list(runset.arms)}")
    series = run_series(runset, arms)
    png, csv = out_dir / "long_run.png", out_dir / "long_run.csv"
    series.to_csv(csv, index=False)
    plot_long_run(series, png)
    return png, csv


def default_long_run_arms(runset: RunSet, baseline: str) -> list[str]:
    """Arms whose runs went past the baseline's deploy step (e.g. `route2b_long` beside `vanilla`)."""
    if baseline not in runset.arms:
        return []
    base_step = runset.arms[baseline][0].deploy.step
    return [arm for arm, runs in runset.arms.items() if runs[0].deploy.step > base_step]
