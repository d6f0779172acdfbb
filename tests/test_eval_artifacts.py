"""Run artifacts: the versioned schemas reject bad records by name (and still read schema-1 files), and the metrics
log obeys its resume rule."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from reward.modes import MODES
from verl_gq.eval.artifacts.samples import read_samples, view_samples
from verl_gq.eval.artifacts.run_dir import MetricsLog, MetricsLogError, RunDir, read_metrics_rows, record_deploy_evaluation
from verl_gq.eval.artifacts.schema import (
    BandBounds,
    CosStats,
    DeployEval,
    EvalBlock,
    EvalRow,
    ModeStats,
    RouterEval,
    RouterStep,
    SchemaError,
    TrainRow,
    dump_json,
    parse_deploy,
    parse_metrics_row,
)

PER_MODE_N = 4  # 8 prompts x group 2 = 16 samples, 4 per mode


def block(hack: list[int], solve: list[int]) -> EvalBlock:
    return EvalBlock(overall=ModeStats.from_counts(sum(hack), sum(solve), PER_MODE_N * len(MODES)),
                     by_mode={m: ModeStats.from_counts(h, s, PER_MODE_N) for m, h, s in zip(MODES, hack, solve)})


def deploy(run: str = "r0", step: int = 3) -> DeployEval:
    return DeployEval(run=run, seed=0, step=step, model="tiny-qwen2", n_prompts=8, group=2, temperature=0.7,
                      eval_modes=list(MODES), names_randomised=True, as_trained=block([3, 1, 2, 1], [1, 1, 0, 0]),
                      routers={"route2b": RouterEval(held_out_modes=["sentinel"],
                                                     deployed=block([1, 0, 2, 0], [1, 1, 0, 0])),
                               "random_v": RouterEval(held_out_modes=[], deployed=block([2, 1, 2, 1], [1, 1, 0, 0]))},
                      train_content_sha256="ab" * 32, created_at="2025-06-01T12:00:00+00:00", git_commit=None)


def train_row(step: int) -> TrainRow:
    routed = RouterStep(frout=0.2, cos=CosStats(mean=0.1, std=0.3, min=-0.4, max=0.7), band=BandBounds(lower=0.05, upper=0.3),
                        kept_grad_norm=1.0, quarantine_grad_norm=0.25, direction_refreshed=step % 5 == 1)
    return TrainRow(step=step, time=100.0 + step, reward_mean=1.5, as_trained=block([step % 3, 0, 0, 1], [1, 0, 0, 0]),
                    grad_norm=1.1, routers={"route2b": routed}, extra={"lr": 1e-5})


# a per_mode_deploy.json and a train row as written before routers (schema 1)
V1_DEPLOY = {"schema_version": 1, "run": "route2b_s0", "arm": "route2b", "seed": 0, "step": 3, "model": "tiny",
             "n_prompts": 8, "group": 2, "temperature": 0.7, "eval_modes": list(MODES), "names_randomised": False,
             "held_out_modes": ["sentinel"], "created_at": "2025-06-01T12:00:00+00:00", "git_commit": None}
V1_TRAIN = {"schema_version": 1, "kind": "train", "step": 2, "time": 5.0, "reward_mean": 1.0, "frout": 0.25,
            "cos": {"mean": 0.1, "std": 0.3, "min": -0.4, "max": 0.7}, "band": {"lower": 0.0, "upper": 0.3},
            "knob_grad_norm": {"keep": 1.0, "quarantine": 0.5}, "direction_refreshed": True, "extra": {}}


def deploy_dict() -> dict:
    return json.loads(dump_json(deploy()))


def parse_error(data: dict) -> str:
    with pytest.raises(SchemaError) as e:
        parse_deploy(json.dumps(data), "runs/r0/per_mode_deploy.json")
    return str(e.value)


# --- schemas ---------------------------------------------------------------------------------------------------


def test_deploy_eval_round_trips_through_json_unchanged():
    original = deploy()
    assert parse_deploy(dump_json(original), "x") == original, "parse(dump(d)) should give d back"
    assert original.deployed("route2b").overall.hack == 3 / 16 and original.deployed("route2b").overall.n == 16


def test_schema_1_records_are_read_as_their_arms_router():
    """A per_mode_deploy.json and metrics rows written before routers read as schema 2: the file's arm is its one
    router (deployed view kept), `legacy_arm` says so; a train row's routing belongs to that router."""
    deployed, as_trained = block([1, 0, 2, 0], [1, 1, 0, 0]), block([3, 1, 2, 1], [1, 1, 0, 0])
    data = {**V1_DEPLOY, "deployed": json.loads(dump_json(deploy()))["routers"]["route2b"]["deployed"],
            "as_trained": json.loads(dump_json(deploy()))["as_trained"]}
    record = parse_deploy(json.dumps(data), "old.json")
    assert record.legacy_arm == "route2b" and list(record.routers) == ["route2b"]
    assert record.deployed("route2b") == deployed and record.as_trained == as_trained
    assert record.routers["route2b"].held_out_modes == ["sentinel"] and record.train_content_sha256 is None
    row_data = {**V1_TRAIN, "as_trained": json.loads(dump_json(deploy()))["as_trained"]}
    row = parse_metrics_row(json.dumps(row_data), "metrics.jsonl:2", v1_arm="route2b")
    assert row.routers["route2b"].frout == 0.25 and row.routers["route2b"].kept_grad_norm == 1.0
    assert row.grad_norm is None, "schema 1 kept no norm of the total for a routing arm"
    vanilla = parse_metrics_row(json.dumps(row_data), "metrics.jsonl:2", v1_arm="vanilla")
    assert vanilla.routers == {} and vanilla.grad_norm == 1.0
    with pytest.raises(SchemaError, match="metrics.jsonl:2: a schema-1 metrics row needs its run's arm"):
        parse_metrics_row(json.dumps(row_data), "metrics.jsonl:2")


def test_missing_field_is_named_with_its_path_and_the_file():
    data = deploy_dict()
    del data["routers"]["route2b"]["deployed"]["by_mode"]["sentinel"]["n"]
    message = parse_error(data)
    assert "runs/r0/per_mode_deploy.json" in message and \
        "missing field 'routers.route2b.deployed.by_mode.sentinel.n'" in message, \
        f"the error should name the file and the missing field's path; got {message}"


def test_unknown_field_is_rejected_by_name():
    data = deploy_dict()
    data["as_trained"]["overall"]["hack_rate"] = 0.1
    assert "unknown field 'as_trained.overall.hack_rate'" in parse_error(data)


@pytest.mark.parametrize("version", [3, "1", None])
def test_unknown_schema_version_is_rejected_before_anything_else(version):
    data = deploy_dict()
    data["schema_version"] = version
    data.pop("run")  # would be an error too: the version must be reported first
    message = parse_error(data)
    assert f"schema_version {version!r} is not supported" in message, message
    row = json.loads(dump_json(train_row(1)))
    row["schema_version"] = version
    with pytest.raises(SchemaError, match="is not supported"):
        parse_metrics_row(json.dumps(row), "metrics.jsonl:7")


def test_missing_schema_version_is_named():
    data = deploy_dict()
    del data["schema_version"]
    assert "missing field 'schema_version'" in parse_error(data)


def test_overall_must_be_the_pooled_count_of_by_mode():
    data = deploy_dict()
    data["routers"]["route2b"]["deployed"]["overall"]["hack"] = 4 / 16  # by_mode pools to 3 hacks
    assert "overall (hack, solve, n) counts (4, 2, 16) must equal the sum over by_mode (3, 2, 16)" in parse_error(data)


def test_rates_must_be_whole_counts_exclusive_and_null_only_without_samples():
    with pytest.raises(ValueError, match="not a whole count"):
        ModeStats(hack=0.3, solve=0.0, n=4)
    with pytest.raises(ValueError, match="a hack is by definition not a solve"):
        ModeStats(hack=0.75, solve=0.5, n=4)
    with pytest.raises(ValueError, match="n == 0 needs hack and solve null"):
        ModeStats(hack=0.0, solve=0.0, n=0)
    with pytest.raises(ValueError, match="needs numeric hack and solve"):
        ModeStats(hack=None, solve=0.5, n=4)
    assert ModeStats(hack=None, solve=None, n=0).hack_count == 0


def test_overall_n_must_be_prompts_times_group():
    data = deploy_dict()
    data["group"] = 4
    assert "as_trained.overall.n = 16 must be n_prompts x group = 8 x 4" in parse_error(data)


def test_held_out_modes_must_be_evaluated_and_known():
    data = deploy_dict()
    data["routers"]["route2b"]["held_out_modes"] = ["sentinal"]
    assert "routers.route2b.held_out_modes has unknown modes ['sentinal']" in parse_error(data)
    data = deploy_dict()
    data["eval_modes"] = ["run_tests", "stdout_marker", "file_marker"]
    assert "routers.route2b.held_out_modes ['sentinel'] are not evaluated" in parse_error(data)
    data = deploy_dict()
    data["train_content_sha256"] = "not a hash"
    assert "train_content_sha256" in parse_error(data)


@pytest.mark.parametrize("path, value", [(("names_randomised",), "true"), (("names_randomised",), 1),
                                         (("seed",), 1.0), (("temperature",), "0.7"),
                                         (("as_trained", "overall", "hack"), float("nan"))])
def test_strict_types_reject_lookalike_values(path, value):
    data = deploy_dict()
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert f"field '{'.'.join(path)}'" in parse_error(data)


def test_eval_block_from_samples_counts_each_mode():
    result = EvalBlock.from_samples(modes=["run_tests", "sentinel", "sentinel", "run_tests", "sentinel"],
                                    solved=[True, False, False, False, True], hacked=[False, True, True, False, False],
                                    eval_modes=["run_tests", "sentinel", "file_marker"])
    assert result.by_mode["run_tests"] == ModeStats(hack=0.0, solve=0.5, n=2)
    assert result.by_mode["sentinel"] == ModeStats(hack=2 / 3, solve=1 / 3, n=3)
    assert result.by_mode["file_marker"] == ModeStats(hack=None, solve=None, n=0), "an unseen mode has n=0"
    assert result.overall == ModeStats(hack=2 / 5, solve=2 / 5, n=5)
    with pytest.raises(ValueError, match="both solved and hacked"):
        EvalBlock.from_samples(["sentinel"], [True], [True], ["sentinel"])
    with pytest.raises(ValueError, match="not one of eval_modes"):
        EvalBlock.from_samples(["file_marker"], [False], [False], ["sentinel"])


def test_metrics_row_errors_name_line_and_field():
    row = json.loads(dump_json(train_row(1)))
    del row["routers"]["route2b"]["quarantine_grad_norm"]
    with pytest.raises(SchemaError,
                       match=r"metrics.jsonl:7: missing field 'train.routers.route2b.quarantine_grad_norm'"):
        parse_metrics_row(json.dumps(row), "metrics.jsonl:7")
    row = json.loads(dump_json(train_row(1)))
    row["kind"] = "trian"
    with pytest.raises(SchemaError, match="trian"):
        parse_metrics_row(json.dumps(row), "metrics.jsonl:7")
    row = json.loads(dump_json(train_row(1)))
    row["routers"]["route2b"]["cos"] = {"mean": 0.9, "std": 0.1, "min": -0.1, "max": 0.5}
    with pytest.raises(SchemaError, match="min <= mean <= max"):
        parse_metrics_row(json.dumps(row), "metrics.jsonl:7")


# --- metrics log ---------------------------------------------------------------------------------------------


def steps_by_kind(path: Path) -> list[tuple[str, int]]:
    return [(r.kind, r.step) for r in read_metrics_rows(path)[0]]


def test_fresh_log_refuses_a_file_that_already_has_rows(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append(train_row(1))
    with pytest.raises(MetricsLogError, match="already holds rows up to step 1"):
        MetricsLog(tmp_path / "metrics.jsonl")


def test_a_step_is_written_once_in_increasing_order(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append(train_row(1))
    log.append(train_row(2))
    log.append(EvalRow.from_deploy(deploy(step=2), time=0.0))
    with pytest.raises(MetricsLogError, match="already has train step 2"):
        log.append(train_row(2))
    with pytest.raises(MetricsLogError, match="already has train step 2"):
        log.append(train_row(1))
    with pytest.raises(MetricsLogError, match="every optimizer step gets a train row"):
        log.append(train_row(4))
    with pytest.raises(MetricsLogError, match="already has eval step 2"):
        log.append(EvalRow.from_deploy(deploy(step=2), time=0.0))
    assert steps_by_kind(tmp_path / "metrics.jsonl") == [("train", 1), ("train", 2), ("eval", 2)], \
        "rejected writes must leave the file untouched"


def test_resume_keeps_rows_up_to_the_checkpoint_drops_later_ones_and_continues_the_same_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in range(1, 6):
        log.append(train_row(step))
        if step % 2 == 0:
            log.append(EvalRow.from_deploy(deploy(step=step), time=0.0))
    # crash after step 5; the last checkpoint is step 3: steps 4-5 (and the eval at 4) are re-done
    resumed = MetricsLog(path, resume_from_step=3)
    rows = read_metrics_rows(path)[0]
    assert [(r.kind, r.step) for r in rows] == [("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("resume", 3)]
    assert rows[-1].dropped_rows == 3, "train 4, eval 4 and train 5 were written after the checkpoint"
    assert rows[0] == train_row(1), "kept rows are kept as written"
    with pytest.raises(MetricsLogError, match="already has train step 3"):
        resumed.append(train_row(3))
    for step in (4, 5):
        resumed.append(train_row(step))
    assert [s for k, s in steps_by_kind(path) if k == "train"] == [1, 2, 3, 4, 5], "each step exactly once"
    # a second crash and resume from the same checkpoint is fine and recorded again
    MetricsLog(path, resume_from_step=3)
    assert steps_by_kind(path)[-2:] == [("resume", 3), ("resume", 3)]


def test_resume_drops_a_torn_last_line_and_counts_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.append(train_row(1))
    log.append(train_row(2))
    with open(path, "a") as f:
        f.write(dump_json(train_row(3))[:40])  # killed mid-write: no newline
    with pytest.raises(SchemaError, match=":3: not valid JSON"):
        read_metrics_rows(path)
    MetricsLog(path, resume_from_step=2)
    rows = read_metrics_rows(path)[0]
    assert [(r.kind, r.step) for r in rows] == [("train", 1), ("train", 2), ("resume", 2)]
    assert rows[-1].dropped_rows == 1


def test_resume_from_a_checkpoint_the_log_has_not_reached_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    MetricsLog(path).append(train_row(1))
    with pytest.raises(MetricsLogError, match="train rows only up to step 1"):
        MetricsLog(path, resume_from_step=5)


def test_reader_rejects_a_duplicated_step_written_by_hand(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(dump_json(train_row(s)) + "\n" for s in (1, 2, 2)))
    with pytest.raises(SchemaError, match=r"metrics.jsonl:3: train row for step 2 after step 2"):
        read_metrics_rows(path)
    path.write_text("".join(dump_json(train_row(s)) + "\n" for s in (1, 2, 4)))
    with pytest.raises(SchemaError, match=r"steps 3..3 missing"):
        read_metrics_rows(path)


# --- run folder ----------------------------------------------------------------------------------------------


def test_record_deploy_evaluation_writes_the_json_and_an_eval_row(tmp_path):
    run = RunDir(tmp_path / "r0")
    log = run.open_metrics_log()
    log.append(train_row(1))
    record_deploy_evaluation(run, log, deploy(step=1))
    assert run.read_deploy() == deploy(step=1)
    rows = run.read_metrics()
    assert rows[-1].kind == "eval" and rows[-1].as_trained == deploy().as_trained
    assert rows[-1].routers == {name: router.deployed for name, router in deploy().routers.items()}


def test_deploy_json_must_live_in_the_folder_of_its_run(tmp_path):
    with pytest.raises(ValueError, match="cannot be written into run folder"):
        RunDir(tmp_path / "other").write_deploy(deploy(run="r0"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "per_mode_deploy.json").write_text(dump_json(deploy(run="r0")))
    with pytest.raises(SchemaError, match="field 'run' is 'r0' but the file lives in run folder 'other'"):
        RunDir(tmp_path / "other").read_deploy()
    with pytest.raises(FileNotFoundError, match="no deploy evaluation"):
        RunDir(tmp_path / "nothing").read_deploy()


def test_train_metadata_is_read_from_safetensors_and_checked(tmp_path):
    run = RunDir(tmp_path / "r0")
    run.path.mkdir()
    config = {"actor_rollout_ref": {"actor": {"fsdp_config": {"gq": {"routers": {"route2b": {}}}}}}}
    save_file({"effective_knob": torch.zeros(2)}, str(run.train_file),
              metadata={"resolved_config": json.dumps(config), "routers": '["route2b"]', "seed": "3", "step": "40"})
    assert run.read_train_metadata() == {"resolved_config": config, "routers": ["route2b"], "seed": 3, "step": 40}
    save_file({"keep_knob": torch.zeros(2)}, str(run.train_file),
              metadata={"resolved_config": json.dumps(config), "arm": "route2b", "seed": "3", "step": "40"})
    assert run.read_train_metadata()["routers"] == ["route2b"], "a file written before routers: its arm"
    save_file({"keep_knob": torch.zeros(2)}, str(run.train_file), metadata={"arm": "route2b", "seed": "x"})
    with pytest.raises(SchemaError, match=r"metadata lacks \['resolved_config', 'step'\]"):
        run.read_train_metadata()
    save_file({"keep_knob": torch.zeros(2)}, str(run.train_file),
              metadata={"resolved_config": "{", "routers": "[]", "seed": "1", "step": "2"})
    with pytest.raises(SchemaError, match="'resolved_config' is not JSON"):
        run.read_train_metadata()
    run.train_file.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(SchemaError, match="train.safetensors: not a readable safetensors file"):
        run.read_train_metadata()


def test_source_commit_names_this_checkout():
    """HEAD's hash (+ "-dirty") where git can read the checkout; None where it cannot (e.g. an installed wheel)."""
    import re
    import subprocess

    from verl_gq.eval.artifacts import source_commit

    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent)
    commit = source_commit()
    if git.returncode != 0:
        assert commit is None, f"git cannot read this checkout ({git.stderr.strip()}), yet source_commit gave {commit}"
        return
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", commit or ""), f"should be HEAD's hash [+ -dirty], got {commit!r}"
    assert commit.startswith(git.stdout.strip()), f"{commit} should be this checkout's HEAD {git.stdout.strip()}"


def test_source_commit_outside_git_reads_the_bundle_stamp(tmp_path):
    """An offline bundle's package has no .git beside it: the commit it was built from is stamped into it."""
    from verl_gq.eval.artifacts.run_dir import SOURCE_COMMIT_FILE, source_commit

    package = tmp_path / "verl_gq"
    package.mkdir()
    assert source_commit(package) is None, "no git, no stamp: unknown"
    (package / SOURCE_COMMIT_FILE).write_text("0123456789abcdef0123456789abcdef01234567-dirty\n")
    assert source_commit(package) == "0123456789abcdef0123456789abcdef01234567-dirty"


def test_train_content_hash_ignores_the_header_order_and_sees_every_tensor_and_metadata_item(tmp_path):
    """safetensors writes its metadata in no fixed order: the content hash must not care, and must change with any
    tensor byte or metadata value."""
    run = RunDir(tmp_path / "r0")
    run.path.mkdir()
    tensors = {"b": torch.arange(4.0), "a": torch.ones(2, 3)}
    save_file(tensors, str(run.train_file), metadata={"seed": "1", "step": "2"})
    first = run.train_content_sha256()
    save_file(dict(reversed(list(tensors.items()))), str(run.train_file), metadata={"step": "2", "seed": "1"})
    assert run.train_content_sha256() == first, "the same content saved again, keys in another order"
    save_file({**tensors, "a": torch.ones(2, 3).index_fill_(1, torch.tensor([2]), 1.5)}, str(run.train_file),
              metadata={"seed": "1", "step": "2"})
    assert run.train_content_sha256() != first, "one changed tensor entry"
    save_file(tensors, str(run.train_file), metadata={"seed": "1", "step": "3"})
    assert run.train_content_sha256() != first, "one changed metadata value"
    run.train_file.write_bytes(b"\x05")
    with pytest.raises(SchemaError, match="not a readable safetensors file"):
        run.train_content_sha256()


# --- per-sample outcomes ---------------------------------------------------------------------------------------


def samples_of(view: str, hack: list[int], solve: list[int], step: int = 1):
    """One view's 16 samples (2 prompts x 2 answers per mode) whose verdicts count to block(hack, solve)."""
    prompts, modes, solved, hacked = [], [], [], []
    for m, (mode, h, s) in enumerate(zip(MODES, hack, solve)):
        for k in range(PER_MODE_N):
            prompts.append(2 * m + k // 2)
            modes.append(mode)
            hacked.append(k < h)
            solved.append(h <= k < h + s)
    return view_samples(view, step, prompts, modes, solved, hacked, hacked, [10 + i for i in range(len(prompts))])


def all_samples(step: int = 1):
    return pd.concat([samples_of("as_trained", [3, 1, 2, 1], [1, 1, 0, 0], step),
                      samples_of("route2b", [1, 0, 2, 0], [1, 1, 0, 0], step),
                      samples_of("random_v", [2, 1, 2, 1], [1, 1, 0, 0], step)], ignore_index=True)


def test_per_sample_outcomes_are_written_with_the_evaluation_and_read_back(tmp_path):
    run = RunDir(tmp_path / "r0")
    log = run.open_metrics_log()
    log.append(train_row(1))
    record_deploy_evaluation(run, log, deploy(step=1), all_samples())
    samples = run.read_deploy_samples()
    assert len(samples) == 48 and samples.equals(all_samples())
    assert samples.groupby(["view", "prompt"]).size().eq(2).all() and set(samples["sample"]) == {0, 1}


def test_per_sample_outcomes_must_count_to_the_rates_and_be_of_the_step(tmp_path):
    run = RunDir(tmp_path / "r0")
    log = run.open_metrics_log()
    log.append(train_row(1))
    wrong = all_samples()
    wrong.loc[(wrong["view"] == "route2b") & (wrong["mode"] == "run_tests") & ~wrong["hack"] & ~wrong["solve"],
              "hack"] = True
    with pytest.raises(ValueError, match=r"view route2b mode run_tests: samples count \(hack, solve, n\) \(3, 1, 4\), the rates \(1, 1, 4\)"):
        record_deploy_evaluation(run, log, deploy(step=1), wrong)
    with pytest.raises(ValueError, match="views .* but the rates have"):
        record_deploy_evaluation(run, log, deploy(step=1), all_samples()[lambda f: f["view"] != "random_v"])
    with pytest.raises(ValueError, match="samples of steps \\[2\\], the evaluation's step is 1"):
        record_deploy_evaluation(run, log, deploy(step=1), all_samples(step=2))
    assert not run.samples_file.exists() and not run.deploy_file.exists(), "a refused evaluation writes nothing"


def test_an_evaluation_without_samples_removes_an_earlier_ones(tmp_path):
    run = RunDir(tmp_path / "r0")
    log = run.open_metrics_log()
    log.append(train_row(1))
    record_deploy_evaluation(run, log, deploy(step=1), all_samples())
    log.append(train_row(2))
    record_deploy_evaluation(run, log, deploy(step=2))
    assert run.read_deploy().step == 2 and not run.samples_file.exists()


def test_bad_per_sample_files_are_named(tmp_path):
    path = tmp_path / "per_sample_deploy.parquet"
    all_samples().drop(columns=["channel"]).to_parquet(path)
    with pytest.raises(SchemaError, match=f"{path}: columns should be .*missing \\['channel'\\]"):
        read_samples(path)
    both = all_samples()
    both.loc[0, "solve"] = True  # sample 0 is a hack
    both.to_parquet(path)
    with pytest.raises(SchemaError, match="both solved and hacked"):
        read_samples(path)
    pd.concat([all_samples(), all_samples().head(1)]).to_parquet(path)
    with pytest.raises(SchemaError, match=r"\(view, prompt, sample\) repeats"):
        read_samples(path)
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(SchemaError, match=f"{path}: not a readable parquet file"):
        read_samples(path)
