"""Task data: sources (sources.py), normalized examples and the loader contract (tasks.py), loader files (loader/)."""
