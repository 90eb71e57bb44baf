"""Training on the shipped data sets: data loading and the training loops."""
