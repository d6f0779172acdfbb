"""From a folder of run folders to the report: collect the comparable arms, then tables (stats) and figures."""
