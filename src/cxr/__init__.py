"""Chest X-ray classification with fine-tuned torchvision backbones."""
