"""Ray and W&B plumbing shared by the stages: cluster connection, telemetry, tracking, a fake cluster."""
