"""Training: the recipe (recipe.py), one trainer per family, the losses, optimization, checkpoints, preflight
checks, monitoring and termination on SIGTERM."""
