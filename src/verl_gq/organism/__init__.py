"""The model organism: a minutes-scale reward-hacking testbed (synthetic problems, SFT corpus, training, base evaluation)."""
