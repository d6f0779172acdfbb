#!/usr/bin/env bash
# The main job on the shipped model organism, on a fresh CPU machine: set up, then train ONE run with every router of
# the study (recipes/organism_study.yaml: route2b per rollout and per token, frozen, held-out modes, the random-
# direction and constant-w controls) for a few GRPO steps through verl's main_ppo (the 7.6M organism in
# src/verl_gq/organism/checkpoint, its synthetic `class Solution` problems under each problem's loophole hint, the
# substrate's graders, the organism's pair set), evaluate the model as trained and each router's deployed model,
# and print the results table (docs/running.md says how to read it).
#   bash scripts/quickstart.sh [extra hydra overrides]
# Three steps of 4 prompts x 4 samples show the pipeline and the organism's real rates, not the method's effect: that
# needs the GPU study (docs/organism.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
BIN=$(cd "${VERL_GQ_VENV:-.venv}" && pwd)/bin
WORK=$(pwd)/${VERL_GQ_WORK:-out/quickstart}
rm -rf "$WORK/runs" "$WORK/checkpoints" "$WORK/report"
mkdir -p "$WORK"
# the organism's parquet: 256 training problems, test_small = 2 held-out problems per mode (recipes/organism_cpu)
"$BIN/verl-gq" data organism --out "$WORK/organism" --n-train 256 --no-token-stats >/dev/null
export VERL_PLATFORM=cpu VERL_GQ_ORGANISM_DATA="$WORK/organism" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
       WANDB_MODE=disabled
unset CUDA_VISIBLE_DEVICES
echo "training the organism with the study's routers (log: $WORK/study.log)"
(cd "$WORK" && "$BIN/python" -m verl.trainer.main_ppo "+recipe=[recipes/organism_study,recipes/organism_cpu]" \
    actor_rollout_ref.actor.fsdp_config.gq.run_dir="$WORK/runs/study_s41" \
    trainer.default_local_dir="$WORK/checkpoints/study" "$@" > "$WORK/study.log" 2>&1) \
  || { tail -40 "$WORK/study.log"; echo "training failed: see $WORK/study.log"; exit 1; }
"$BIN/verl-gq" report "$WORK/runs" --out "$WORK/report" >/dev/null
cat "$WORK/report/keynote.md"
echo "tables, figures and problems: $WORK/report"
