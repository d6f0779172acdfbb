#!/usr/bin/env bash
# One GPU call on a machine without internet (docs/running.md, "Offline bundle"): check the hf rollout's CUDA graphs,
# then an organism_vanilla run with deploy evaluations before training and every 25 steps (the emergence curve: hack
# and solve, as trained, in metrics.jsonl), the last on test_final (4096 answers), within DEADLINE seconds.
#   python scripts/offline_bundle.py                    # here: .bundle/ (git-ignored), carried to the GPU machine
#   DEADLINE=585 bash scripts/organism_gpu_round.sh OUT [hydra overrides]   # there; results under OUT/
# Steps that do not fit are cut by `timeout`: metrics.jsonl keeps every finished step and evaluation.
set -o pipefail
OUT=${1:?usage: organism_gpu_round.sh OUT [hydra overrides]}; shift
DEADLINE=${DEADLINE:-585}
t0=$(date +%s)
mkdir -p "$OUT"
[ -d /tmp/site/verl ] || bash .bundle/install.sh /tmp/site >/dev/null
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider tests/test_verl_plugin_hf_rollout.py -k cuda_graph 2>&1 | tail -1
python3 -m verl_gq.cli data organism --out /tmp/organism_data --no-token-stats 2>&1 | tail -1
echo "== setup done at $(( $(date +%s) - t0 )) s; launch epoch $(date +%s.%N)" | tee "$OUT/launch.txt"
VERL_GQ_ORGANISM_DATA=/tmp/organism_data VERL_FILE_LOGGER_PATH="$OUT/steps.jsonl" \
  timeout $(( DEADLINE - ($(date +%s) - t0) )) python3 -m verl.trainer.main_ppo +recipe=recipes/organism_vanilla \
  seed=41 trainer.total_training_steps=200 trainer.test_freq=25 trainer.val_before_train=true \
  'trainer.logger=[console,file]' actor_rollout_ref.actor.fsdp_config.gq.run_dir="$OUT/vanilla_s41" "$@" \
  > "$OUT/train.log" 2>&1
echo "== main_ppo rc $? at $(( $(date +%s) - t0 )) s"
