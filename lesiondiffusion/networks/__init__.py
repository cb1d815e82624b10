"""Network pieces used by both a bundle's training and the package's inference pipelines."""
