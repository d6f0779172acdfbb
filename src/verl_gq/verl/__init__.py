"""Everything that touches verl: registrations, engine, config, trainer hooks, HF rollout, CPU platform."""

# Import verl before any verl_gq.verl submodule runs: `import verl` loads verl-gq's plugin (verl.plugins entry
# point), which imports these submodules. A process whose first import is a submodule (a Ray actor unpickling
# HFRolloutServer, say) would otherwise hand the plugin a half-initialised module.
import verl  # noqa: F401, E402
