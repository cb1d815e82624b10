"""Code of the preprocess bundle (inputs, organ segmentation, the inference loop, report providers)."""
