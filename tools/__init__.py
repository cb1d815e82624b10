"""The ``lesiondiffusion`` command line: chains the bundles and wraps the shared tools."""
