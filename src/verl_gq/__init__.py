"""verl-gq: gradient quarantine (route2b) for GRPO.

The method (adapter/, routing/) imports torch only; verl/ wires it into verl; eval/ holds run artifacts.
"""

__version__ = "0.1.0"
