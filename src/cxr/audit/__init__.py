"""What the data and a trained model can be caught doing: leakage, duplicates, the source baseline, the checks."""
