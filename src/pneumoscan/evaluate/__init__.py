"""Evaluation: metrics of a model on a labelled split, model comparison, the HTML report, shortcut
audit."""
