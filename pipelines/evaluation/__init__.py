"""Measuring answers: generation, scoring, the judge, gates, the report and the metrics."""
