"""A trained model on new images: loading, predict, export, the demo page."""
