"""Observation: the run log, reasoning statistics, held-out evaluation and pass@k, and reading a run back
(inspect, the HTML report)."""
