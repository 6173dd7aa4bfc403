"""Tasks with a known ground-truth reward, built offline by the package."""
