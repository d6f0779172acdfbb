#!/usr/bin/env bash
# One GPU call on a machine without internet (docs/running.md, "Offline bundle"): check the hf rollout's CUDA graphs,
# then an organism run (default organism_vanilla, seed 41) towards 200 steps with deploy evaluations before training
# and every 25 steps (the emergence curve: hack and solve, as trained, in metrics.jsonl), the last on test_final
# (4096 answers a view), within DEADLINE seconds.
#   python scripts/offline_bundle.py                    # here: .bundle/ (git-ignored), carried to the GPU machine
#   DEADLINE=585 bash scripts/organism_gpu_round.sh OUT [hydra overrides]   # there; results under OUT/
# The run checkpoints every 10 steps into out/ (git-ignored, so kept on a machine that stays warm): the same command
# on the same machine resumes it (verl's resume_mode auto). A call that runs out of time interrupts training (SIGINT,
# so Ray shuts down through its own exit path); metrics.jsonl keeps every finished step and evaluation.
# RECIPE and SEED choose the run (e.g. RECIPE=organism_study SEED=43).
set -o pipefail
OUT=${1:?usage: organism_gpu_round.sh OUT [hydra overrides]}; shift
DEADLINE=${DEADLINE:-585}
RECIPE=${RECIPE:-organism_vanilla}
SEED=${SEED:-41}
t0=$(date +%s)
mkdir -p "$OUT" out
[ -d /tmp/site/verl ] || bash .bundle/install.sh /tmp/site >/dev/null
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
[ -f out/.cuda_graph_checked ] || {
  python3 -m pytest -q -p no:cacheprovider tests/test_verl_plugin_hf_rollout.py -k cuda_graph 2>&1 | tail -1
  touch out/.cuda_graph_checked; }
[ -f data/organism/test_final.parquet ] || python3 -m verl_gq.cli data organism --out data/organism --no-token-stats 2>&1 | tail -1
NAME=$(python3 -c "print('$RECIPE'.removeprefix('organism_'))")_s$SEED
RUN=out/organism/runs/$NAME
echo "== setup done at $(( $(date +%s) - t0 )) s; launch epoch $(date +%s.%N)" | tee "$OUT/launch.txt"
VERL_GQ_ORGANISM_DATA=data/organism VERL_FILE_LOGGER_PATH="$OUT/steps.jsonl" \
  timeout -s INT -k 30 $(( DEADLINE - 40 - ($(date +%s) - t0) )) python3 -m verl.trainer.main_ppo \
  +recipe=recipes/$RECIPE seed=$SEED trainer.total_training_steps=200 trainer.test_freq=25 \
  trainer.val_before_train=true trainer.save_freq=10 trainer.max_actor_ckpt_to_keep=1 'trainer.logger=[console,file]' \
  "$@" > "$OUT/train.log" 2>&1
echo "== main_ppo rc $? at $(( $(date +%s) - t0 )) s; last checkpoint: $(cat out/organism/checkpoints/*/latest_checkpointed_iteration.txt 2>/dev/null)"
nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader
tar -czf "$OUT/run.tar.gz" --exclude='*.safetensors' -C out/organism/runs "$NAME"
python3 - "$OUT/steps.jsonl" "$RUN/metrics.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l)["data"] for l in open(sys.argv[1])] if __import__("os").path.exists(sys.argv[1]) else []
rows = [r for r in rows if "timing_s/step" in r]
print("steps this call", len(rows))
for key in ("step", "gen", "ref", "update_actor", "update_weights", "testing", "save_checkpoint"):
    v = [r[f"timing_s/{key}"] for r in rows[1:] if f"timing_s/{key}" in r]
    if v: print(f"  {key}: median {statistics.median(v):.3f} s over {len(v)}")
for line in open(sys.argv[2]):
    r = json.loads(line)
    if r["kind"] == "eval":
        views = {"as_trained": r["as_trained"]["overall"], **{k: v["overall"] for k, v in r["routers"].items()}}
        print("eval", r["step"], r["n_prompts"], "x", r["group"], views)
    elif r["kind"] == "train" and r["step"] % 10 == 0:
        print("train", r["step"], "reward", round(r["reward_mean"], 3), r["as_trained"]["overall"])
PY
