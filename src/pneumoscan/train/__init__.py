"""Training: the training loop, its callbacks, and site calibration (AdaBN, head refit,
threshold)."""
