"""What verl 0.9.1 lacks to run where vLLM and GPUs are absent or the defaults are slow, filled in by verl-gq and
registered by verl_gq/verl/plugin.py: an HF-transformers rollout backend (hf_rollout), a CPU platform (platform_cpu),
a replay buffer that polls for finished rollouts every 0.1 s instead of 2 s (replay_buffer), and log-probs computed
in row blocks where verl would loop over tokens (logprobs). None of it is specific to gradient quarantine."""
