"""Training: data pipeline (data.py), schedules, the training loop and FP → ternary adaptation."""
