"""What a reader sees: README's generated tables, the model card, comparisons between runs."""
