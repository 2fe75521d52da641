"""What the images are: the dataset's layout, decoding, splits, caches, augmentation, lung fields."""
