#!/usr/bin/env bash
# The organism study on one GPU box without vLLM or internet (the lent H100): installs the offline bundle, builds
# the organism's parquet, runs each RECIPE:SEED of RUNS through main_ppo (recipes/organism_*.yaml: the shipped
# 7.6M organism, hf rollout, 16 prompts x 16 samples, 18 steps, deploy evaluations at steps 6, 12, 18), up to
# CONCURRENCY at once on the one GPU, then runs scripts/report.py over the run folders.
#   [RUNS="organism_vanilla:41 organism_route2b:41"] [CONCURRENCY=1] [PREPARE_ARGS=--infer-only] \
#     bash scripts/gpu_organism.sh OUT_DIR [overrides]
# A RECIPE joins overlays with '+': organism_route2b+held_out_modes:41 is '+recipe=[recipes/organism_route2b,
# recipes/held_out_modes]' (run folder route2b_heldout_s41). Extra arguments are Hydra overrides for every run.
# A device call runs at most 10 minutes: pick RUNS and CONCURRENCY so that every wave of runs fits in one.
#
# Concurrency: each run is its own main_ppo process with its own Ray instance (ray.init with address=local, so a
# run never joins another's cluster; Ray picks free ports for each), its own run folder, checkpoint folder, log
# and metrics file. The organism is 15 MB in bf16, so a run's GPU memory is its activations and its processes'
# CUDA contexts and the GPU holds several; the box's 16 cores (rollout servers, reward graders, Ray) are what they
# share. On the H100: ~12 s a step alone, ~24 s each with four at once (after the engine's block log-probs; the
# earlier 32-40 s was verl's per-token log-prob loop, not the sharing). Without an in-run evaluation
# (trainer.test_freq=-1), two runs of 18 steps fit one call with room (467-517 s, start-up included); four fit only
# at times (some were cut at step 17, and a cut run has no train.safetensors). The study's commands are in
# docs/results/organism-h100-study-2026-11-24.md. Use a fresh OUT_DIR per call: a run refuses a non-empty metrics log.
#
# OUT_DIR/runs/<run>/      run artifacts (docs/outputs.md): metrics.jsonl, per_mode_deploy.json, train.safetensors
# OUT_DIR/logs/<recipe>_s<seed>.log  main_ppo's output; .jsonl: verl's per-step metrics
# OUT_DIR/report/          scripts/report.py's tables and figures (keynote.md printed at the end)
# Off the lent box (a dry run of this driver on CPU): PYTHON=<venv python> BUNDLE=0 VERL_PLATFORM=cpu and the CPU
# overlay in each recipe, e.g. RUNS="organism_vanilla+organism_cpu:41 organism_route2b+organism_cpu:41".
set -euo pipefail
OUT_DIR=$(mkdir -p "${1:?usage: gpu_organism.sh OUT_DIR [overrides]}" && cd "$1" && pwd); shift
RUNS=${RUNS:-"organism_vanilla:41 organism_route2b:41"}
CONCURRENCY=${CONCURRENCY:-1}
cd "$(dirname "$0")/.."
mkdir -p "$OUT_DIR/logs" "$OUT_DIR/runs"
PY=${PYTHON:-python3}
if [ "${BUNDLE:-1}" = 1 ]; then [ -d /tmp/site/verl ] || bash .bundle/install.sh /tmp/site >/dev/null; fi
export PYTHONPATH=$PWD:/tmp/site:${PYTHONPATH:-} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled \
       PYTHONUNBUFFERED=1 VERL_GQ_ORGANISM_DATA=$OUT_DIR/data
unset RAY_ADDRESS
# PREPARE_ARGS: options of prepare_organism.py. The study's default, --infer-only: problems whose constants are
# inferred from the examples, which the organism solves ~7% of the time; on the whole grammar its exploit did not grow
# in 19 steps (docs/results/organism-h100-study-2026-11-24.md). PREPARE_ARGS= keeps the whole grammar.
# shellcheck disable=SC2086
"$PY" scripts/prepare_organism.py --out "$VERL_GQ_ORGANISM_DATA" ${PREPARE_ARGS---infer-only} > "$OUT_DIR/logs/data.log" 2>&1

run_one() {  # RECIPE[+OVERLAY...]:SEED [overrides]
  local spec=$1; shift
  local recipe=${spec%%:*} seed=${spec##*:}
  local recipes="recipes/${recipe//+/,recipes/}" name=${recipe//+/_}_s$seed
  local started=$SECONDS
  VERL_FILE_LOGGER_PATH=$OUT_DIR/logs/$name.jsonl "$PY" -m verl.trainer.main_ppo "+recipe=[$recipes]" seed="$seed" \
      "actor_rollout_ref.actor.fsdp_config.gq.run_dir=$OUT_DIR/runs/\${trainer.experiment_name}" \
      "trainer.default_local_dir=$OUT_DIR/checkpoints/\${trainer.experiment_name}" \
      +ray_kwargs.ray_init.address=local 'trainer.logger=[console,file]' "$@" > "$OUT_DIR/logs/$name.log" 2>&1 \
    && echo "$name: done in $((SECONDS - started)) s" \
    || { echo "$name: FAILED after $((SECONDS - started)) s"; tail -30 "$OUT_DIR/logs/$name.log"; return 1; }
}

# The device tool returns neither nested folders nor many files: everything a run writes goes back as one tarball,
# also when the call's time limit stops this script mid-run (the runs' metrics.jsonl grow step by step).
pack() { tar czf "$OUT_DIR/study.tgz" -C "$OUT_DIR" runs logs report 2>/dev/null || true; }
trap 'pack; exit 124' TERM INT
trap pack EXIT

status=0
running=0
for spec in $RUNS; do
  if [ "$running" -ge "$CONCURRENCY" ]; then wait -n || status=1; running=$((running - 1)); fi
  run_one "$spec" "$@" &
  running=$((running + 1))
done
while [ "$running" -gt 0 ]; do wait -n || status=1; running=$((running - 1)); done

"$PY" scripts/report.py "$OUT_DIR/runs" --out "$OUT_DIR/report" > "$OUT_DIR/logs/report.log" 2>&1 || status=1
cat "$OUT_DIR/report/keynote.md" 2>/dev/null || tail -20 "$OUT_DIR/logs/report.log"
exit $status
