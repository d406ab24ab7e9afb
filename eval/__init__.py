"""Evaluation of trained SAEs: reconstruction, downstream LM loss, explainability.

Not built yet: `python -m eval` is the work of its own issues.
"""
