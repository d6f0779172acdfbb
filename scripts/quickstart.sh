#!/usr/bin/env bash
# The main job on the shipped model organism, on a fresh CPU machine: set up, then train the vanilla and route2b
# arms for a few GRPO steps each through verl's main_ppo (the 7.6M organism in verl_gq/organism/checkpoint, its
# synthetic `class Solution` problems under each problem's loophole hint, the substrate's graders, the organism's
# pair set), evaluate each with the quarantine off (deployed) and on (as trained), and print the results table.
# About 10 minutes on 2 cores (docs/running.md).
#   bash scripts/quickstart.sh [extra hydra overrides for both arms]
# Three steps of 4 prompts x 4 samples show the pipeline and the organism's real rates (it solves ~40% and
# exploits a few % under the hint), not the method's effect: that needs the GPU runs (scripts/gpu_organism.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=$(cd "${VERL_GQ_VENV:-.venv}" && pwd)/bin/python
WORK=$(pwd)/${VERL_GQ_WORK:-out/quickstart}
rm -rf "$WORK/runs" "$WORK/checkpoints" "$WORK/report"
mkdir -p "$WORK"
# the organism's parquet: 256 training problems, test_small = 2 held-out problems per mode (recipes/organism_cpu)
"$PY" scripts/prepare_organism.py --out "$WORK/organism" --n-train 256 --no-token-stats >/dev/null 2>&1
export VERL_PLATFORM=cpu VERL_GQ_ORGANISM_DATA="$WORK/organism" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
       WANDB_MODE=disabled
unset CUDA_VISIBLE_DEVICES
for arm in vanilla route2b; do
  echo "training $arm on the organism (log: $WORK/$arm.log)"
  (cd "$WORK" && "$PY" -m verl.trainer.main_ppo "+recipe=[recipes/organism_$arm,recipes/organism_cpu]" \
      actor_rollout_ref.actor.fsdp_config.gq.run_dir="$WORK/runs/$arm" \
      trainer.default_local_dir="$WORK/checkpoints/$arm" "$@" > "$WORK/$arm.log" 2>&1) \
    || { tail -40 "$WORK/$arm.log"; echo "$arm failed: see $WORK/$arm.log"; exit 1; }
done
"$PY" scripts/report.py "$WORK/runs" --out "$WORK/report" >/dev/null
cat "$WORK/report/keynote.md"
echo "tables, figures and problems: $WORK/report"
