"""Pseudo-labels: the scoring stage and the rules that turn cached scores into labels."""
from vlpl.pseudolabel import rules  # noqa: F401  (registers the rules)
