"""The quality study: a small base pretrained on the Python documentation, fine-tuned per method on
WordNet tasks, scored on held-out synsets (benchmarks/quality_study.py runs it)."""
