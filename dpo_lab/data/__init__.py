"""Data: sources of preference rows, their tokenization, batching and the data module."""
