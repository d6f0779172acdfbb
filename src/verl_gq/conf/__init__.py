"""Hydra config package of verl-gq (`pkg://verl_gq.conf`): the `recipe` group; recipe/recipes links to recipes/."""
