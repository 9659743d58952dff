"""The compiler: options → load → capture → passes → lower → build → package (pipeline.py)."""
