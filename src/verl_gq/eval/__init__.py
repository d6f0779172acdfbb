"""Run evaluation and its artifacts.

- `artifacts`: the run folder's files, their versioned schemas, readers and writers (no torch: a report machine needs
  none);
- `deploy`: a saved run's deploy evaluation outside verl (as trained and each router's deployed model);
- `report`: the tables and figures from a folder of run folders.
"""
