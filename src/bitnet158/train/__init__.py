"""Training: the data pipeline (data/), schedules, the one training loop (trainer.py) and FP →
ternary conversion (ternarize.py with its hooks, calibration and AdaRound; convert_run.py)."""
