"""Telemetry: MLflow tracking (rank 0) and, later, the Prometheus exporter (every rank)."""
