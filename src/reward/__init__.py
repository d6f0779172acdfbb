"""The LeetCode loophole environment: problems, prompts, modes, sandbox, graders, pairs. Imports neither torch nor verl."""
