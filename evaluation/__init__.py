"""Evaluation shared by every stage that judges predictions: metrics with patient-bootstrap intervals
and the alert's operating point. A leaf: it imports nothing of the pipeline."""
