"""The paper's tables from collected runs: keynote (n-seed), ablation, held-out modes.

Each table is a `Table`: a frame of numbers (written as CSV) and a markdown rendering with its notes (what the
numbers are, which test, alpha). Comparison rule: an arm is compared with the baseline only when both have at
least 2 seeds and their deploy evaluations share settings (`collect.eval_settings`); otherwise its delta and
p are empty and the note says why. A single-seed arm is shown with its value, never averaged or tested against
multi-seed arms. Deltas are paired: the mean over the seeds both arms have of (arm - baseline).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import pandas as pd

from verl_gq.eval.report.collect import Run, RunSet, differing_fields, eval_settings
from verl_gq.eval.report.stats import TEST_NAME, holm, mean_sem, paired_t_test, prompt_clustered_se

# the router settings the ablation table shows (empty for vanilla and as_trained)
ABLATION_CONFIG_FIELDS = ("granularity", "direction", "band", "match", "refresh", "direction_modes")


@dataclass(frozen=True)
class Table:
    name: str
    frame: pd.DataFrame
    markdown: str


def _nan_none(x: Any) -> Optional[float]:
    """None for a missing number, whether it came through pandas (NaN) or not (None)."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _mean_sem_text(mean: Optional[float], sem: Optional[float], n: int) -> str:
    mean, sem = _nan_none(mean), _nan_none(sem)
    if mean is None:
        return "n/a"
    if n == 1:
        return f"{mean:.3f} (1 seed)"
    return f"{mean:.3f} ± {sem:.3f}"


def _p_text(p: Optional[float], note: str, alpha: float) -> str:
    if p is None:
        return note or "n/a"
    return f"{p:.3g}{' *' if p < alpha else ''}"


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table of a frame of display strings."""
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _ordered_arms(runset: RunSet, baseline: str) -> list[str]:
    return sorted(runset.arms, key=lambda arm: (arm != baseline, arm))


def comparison_blocker(runset: RunSet, arm: str, baseline: str) -> str:
    """Why `arm` cannot be compared with the baseline ('' when it can)."""
    if arm == baseline:
        return "baseline"
    if baseline not in runset.arms:
        return f"n/a (no complete baseline arm {baseline!r})"
    runs, base = runset.arms[arm], runset.arms[baseline]
    if len(runs) < 2 or len(base) < 2:
        return "n/a (single seed: not compared)"
    mine, theirs = eval_settings(runs[0].deploy), eval_settings(base[0].deploy)
    differ = differing_fields(mine, theirs)
    if differ:
        return f"n/a (eval settings differ from baseline: {', '.join(differ)})"
    return ""


def _per_seed(runs: Sequence[Run], value: Callable[[Run], Optional[float]]) -> dict[int, float]:
    """value(run) by seed, leaving out seeds where it is undefined (a mode with no samples)."""
    out = {}
    for run in runs:
        v = value(run)
        if v is not None:
            out[run.seed] = v
    return out


def _summary(prefix: str, values: dict[int, float]) -> dict[str, Any]:
    if not values:
        return {f"{prefix}_mean": None, f"{prefix}_sem": None}
    mean, sem = mean_sem(list(values.values()))
    return {f"{prefix}_mean": mean, f"{prefix}_sem": sem}


def _comparison(prefix: str, values: dict[int, float], base: dict[int, float], blocker: str) -> dict[str, Any]:
    if blocker:
        return {f"delta_{prefix}": None, f"delta_{prefix}_sem": None, f"delta_{prefix}_ci95_low": None,
                f"delta_{prefix}_ci95_high": None, f"p_{prefix}": None, f"p_{prefix}_wilcoxon": None,
                f"n_pairs_{prefix}": None, f"note_{prefix}": blocker}
    test = paired_t_test(values, base)
    low, high = test.ci95 or (None, None)
    return {f"delta_{prefix}": test.mean_diff, f"delta_{prefix}_sem": test.sem_diff, f"delta_{prefix}_ci95_low": low,
            f"delta_{prefix}_ci95_high": high, f"p_{prefix}": test.p, f"p_{prefix}_wilcoxon": test.p_wilcoxon,
            f"n_pairs_{prefix}": test.n_pairs, f"note_{prefix}": test.note}


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows as a frame whose count columns stay integers where some rows have none."""
    frame = pd.DataFrame(rows)
    for column in frame.columns:
        if column.startswith("n_pairs_"):
            frame[column] = frame[column].astype("Int64")
    return frame


def _delta_text(row: dict[str, Any], prefix: str) -> str:
    if row[f"delta_{prefix}"] is None:
        return "—" if row[f"note_{prefix}"] == "baseline" else row[f"note_{prefix}"]
    low = _nan_none(row.get(f"delta_{prefix}_ci95_low"))
    interval = "" if low is None else f" [{low:.3f}, {row[f'delta_{prefix}_ci95_high']:.3f}]"
    return f"{_mean_sem_text(row[f'delta_{prefix}'], row[f'delta_{prefix}_sem'], row[f'n_pairs_{prefix}'])}" \
           f"{interval} (n={row[f'n_pairs_{prefix}']})"


def _samples_by_seed(runs: Sequence[Run]) -> dict[int, pd.DataFrame]:
    return {run.seed: run.samples for run in runs if run.samples is not None}


def _se_text(se: Optional[float]) -> str:
    se = _nan_none(se)
    return "n/a" if se is None else f"{se:.3f}"


def _p_holm_text(row: dict[str, Any], prefix: str, alpha: float) -> str:
    if row[f"note_{prefix}"] == "baseline":
        return "—"
    text = _p_text(row[f"p_{prefix}"], row[f"note_{prefix}"], alpha)
    adjusted = _nan_none(row.get(f"p_{prefix}_holm"))
    return text if adjusted is None else f"{text} [{adjusted:.3g}{' *' if adjusted < alpha else ''}]"


def _test_note(alpha: float, baseline: str) -> str:
    return (f"Mean ± SEM over seeds (SEM = sample std / sqrt(n)). Δ = paired mean over common seeds of "
            f"(arm − {baseline}), [95% t interval of that mean], n = pairs. Test: {TEST_NAME}, assuming roughly "
            f"normal per-seed differences; alpha = {alpha}; * marks p < alpha; p is not adjusted for the number of "
            f"arms compared. "
            f"Arms with one seed or other eval settings are shown but not compared.")


def keynote_table(runset: RunSet, baseline: str, alpha: float) -> Table:
    """Per arm: deploy (knob-off) hack and solve over seeds, and their paired change vs the baseline."""
    base_runs = runset.arms.get(baseline, [])
    metrics = {"hack": lambda r: r.deploy.deployed.overall.hack, "solve": lambda r: r.deploy.deployed.overall.solve}
    rows = []
    for arm in _ordered_arms(runset, baseline):
        runs = runset.arms[arm]
        blocker = comparison_blocker(runset, arm, baseline)
        row: dict[str, Any] = {"arm": arm, "n_seeds": len(runs), "seeds": " ".join(str(r.seed) for r in runs),
                               "step": runs[0].deploy.step}
        for name, value in metrics.items():
            values = _per_seed(runs, value)
            row.update(_summary(f"deploy_{name}", values))
            row.update(_comparison(name, values, _per_seed(base_runs, value), blocker))
            row[f"delta_{name}_se_prompt"] = None if blocker else prompt_clustered_se(
                _samples_by_seed(runs), _samples_by_seed(base_runs), name)
        row["alpha"] = alpha
        rows.append(row)
    for name in metrics:  # Holm over the arms compared in this table, per outcome
        adjusted = holm({r["arm"]: r[f"p_{name}"] for r in rows if r[f"p_{name}"] is not None})
        for r in rows:
            r[f"p_{name}_holm"] = adjusted.get(r["arm"])
    frame = _frame(rows)
    display = pd.DataFrame({
        "arm": frame["arm"],
        "seeds (n)": [f"{r['seeds']} ({r['n_seeds']})" for r in rows],
        "deploy hack": [_mean_sem_text(r["deploy_hack_mean"], r["deploy_hack_sem"], r["n_seeds"]) for r in rows],
        "deploy solve": [_mean_sem_text(r["deploy_solve_mean"], r["deploy_solve_sem"], r["n_seeds"]) for r in rows],
        f"Δ hack vs {baseline}": [_delta_text(r, "hack") for r in rows],
        "SE by prompt (hack)": [_se_text(r["delta_hack_se_prompt"]) for r in rows],
        "p (hack) [Holm]": [_p_holm_text(r, "hack", alpha) for r in rows],
        f"Δ solve vs {baseline}": [_delta_text(r, "solve") for r in rows],
        "SE by prompt (solve)": [_se_text(r["delta_solve_se_prompt"]) for r in rows],
        "p (solve) [Holm]": [_p_holm_text(r, "solve", alpha) for r in rows],
    })
    note = (f"{_test_note(alpha, baseline)} [Holm]: p adjusted over the arms this table compares. SE by prompt: the "
            f"paired difference's standard error clustered by prompt, from the per-sample outcomes (n/a without "
            f"them, as in runs written before they were kept). keynote.csv also holds the exact Wilcoxon "
            f"signed-rank p of the same differences (p_hack_wilcoxon, p_solve_wilcoxon; zero differences dropped).")
    if all(row["n_seeds"] < 2 for row in rows):  # nothing can be compared: the rates alone
        display = display[["arm", "seeds (n)", "deploy hack", "deploy solve"]]
        note = "One seed per arm: rates only; comparisons need at least 2 seeds of an arm and the baseline."
    markdown = f"## Keynote: deploy (knob off) hack and solve\n\n{markdown_table(display)}\n\n{note}\n"
    return Table("keynote", frame, markdown)


def ablation_table(runset: RunSet, baseline: str) -> Table:
    """Every arm: its config, deployed and as-trained rates, the knob's effect, and the routed fraction."""
    rows = []
    for arm in _ordered_arms(runset, baseline):
        runs = runset.arms[arm]
        row: dict[str, Any] = {"arm": arm, "n_seeds": len(runs)}
        for key in ABLATION_CONFIG_FIELDS:
            value = runs[0].router.get(key)
            row[key] = " ".join(value) if isinstance(value, list) else value
        row["held_out_modes"] = " ".join(runs[0].deploy.held_out_modes)
        for block in ("deployed", "as_trained"):
            for metric in ("hack", "solve"):
                row.update(_summary(f"{block}_{metric}",
                                    _per_seed(runs, lambda r: getattr(getattr(r.deploy, block).overall, metric))))
        row.update(_summary("knob_effect_hack", _per_seed(
            runs, lambda r: r.deploy.as_trained.overall.hack - r.deploy.deployed.overall.hack)))
        row.update(_summary("frout", _per_seed(runs, lambda r: float(r.train["frout"].mean()))))
        rows.append(row)
    frame = pd.DataFrame(rows)
    n = frame["n_seeds"].tolist()

    def col(prefix: str) -> list[str]:
        return [_mean_sem_text(m, s, k) for m, s, k in zip(frame[f"{prefix}_mean"], frame[f"{prefix}_sem"], n)]

    display = frame[["arm", "n_seeds", *ABLATION_CONFIG_FIELDS, "held_out_modes"]].fillna("").astype(str).assign(**{
        "deployed hack": col("deployed_hack"), "deployed solve": col("deployed_solve"),
        "as-trained hack": col("as_trained_hack"), "as-trained solve": col("as_trained_solve"),
        "hack removed by deploy": col("knob_effect_hack"), "frout (train mean)": col("frout")})
    markdown = (f"## Ablation: every arm, knob on (as trained) and off (deployed)\n\n{markdown_table(display)}\n\n"
                f"Mean ± SEM over seeds. 'hack removed by deploy' = as-trained − deployed hack, per seed then "
                f"averaged. frout = routed fraction of gradient mass, mean over training steps, then over seeds.\n")
    return Table("ablation", frame, markdown)


def held_out_table(runset: RunSet, baseline: str, alpha: float) -> Table:
    """Per arm and mode: deploy hack/solve, whether the mode's pairs built the direction, and Δ vs baseline."""
    base_runs = runset.arms.get(baseline, [])
    rows = []
    for arm in _ordered_arms(runset, baseline):
        runs = runset.arms[arm]
        blocker = comparison_blocker(runset, arm, baseline)
        held_out = set(runs[0].deploy.held_out_modes)
        for mode in runs[0].deploy.eval_modes:
            row: dict[str, Any] = {"arm": arm, "mode": mode,
                                   "direction": "held-out" if mode in held_out else "held-in"}
            for metric in ("hack", "solve"):
                def value(r: Run, metric: str = metric) -> Optional[float]:
                    return getattr(r.deploy.deployed.by_mode[mode], metric)

                values = _per_seed(runs, value)
                row[f"n_seeds_{metric}"] = len(values)
                row.update(_summary(f"deploy_{metric}", values))
                row.update(_comparison(metric, values, _per_seed(base_runs, value), blocker))
            row["alpha"] = alpha
            rows.append(row)
    frame = _frame(rows)
    display = pd.DataFrame({
        "arm": frame["arm"], "mode": frame["mode"], "direction built from": frame["direction"],
        "deploy hack": [_mean_sem_text(r["deploy_hack_mean"], r["deploy_hack_sem"], r["n_seeds_hack"])
                        for r in rows],
        f"Δ hack vs {baseline}": [_delta_text(r, "hack") for r in rows],
        "p (hack)": [_p_text(r["p_hack"], r["note_hack"], alpha) if r["note_hack"] != "baseline" else "—"
                     for r in rows],
        "deploy solve": [_mean_sem_text(r["deploy_solve_mean"], r["deploy_solve_sem"], r["n_seeds_solve"])
                         for r in rows],
    })
    markdown = (f"## Held-out modes: deploy hack per mode\n\n{markdown_table(display)}\n\n"
                f"held-in: the mode's pairs built the direction and band; held-out: they did not (the arm's "
                f"held_out_modes). {_test_note(alpha, baseline)}\n")
    return Table("held_out_modes", frame, markdown)
