"""Evaluation metrics on real data (accuracy, word similarity, perplexity)."""
