"""All stages: a stages/*.yaml recipe -> the extractions it needs, one training pass per upstream set, a report.

    recipe  the YAML schema and its checks (load_recipe)
    plan    what is cached and what trains (plan_recipe), and running it (run_recipe)
    report  results.csv, results.md and the plots
"""

from fusionpipe.ablate.plan import plan_recipe, run_recipe
from fusionpipe.ablate.recipe import load_recipe

__all__ = ["load_recipe", "plan_recipe", "run_recipe"]
