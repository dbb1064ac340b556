"""Evaluation: held-out loss and perplexity, classification and text metrics, generation."""
