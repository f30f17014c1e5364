"""The evaluation area's error: a bad weights file, metric name or dataset, named in one line."""

from __future__ import annotations


class EvaluationError(Exception):
    """Evaluation cannot run as asked; the message names the file, key or value at fault."""
