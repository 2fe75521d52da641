"""Scores of a model's outputs: the metrics table, intervals, calibration, Grad-CAM, masked views, figures."""
