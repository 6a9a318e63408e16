"""All stages: a stages/*.yaml recipe -> the extractions it needs, one training pass per upstream set, a report.

    plan    the recipe's schema, its plan (what is cached, what trains), and running it
    report  results.csv, results.md and the plots
"""

from fusionpipe.ablate.plan import load_recipe, run_recipe

__all__ = ["load_recipe", "run_recipe"]
