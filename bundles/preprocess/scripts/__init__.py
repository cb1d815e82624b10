"""The preprocess bundle has no code of its own: its configs build :mod:`lesiondiffusion.pipelines.preprocess`
(inference) and :mod:`lesiondiffusion.pipelines.prepare` (training-set preparation)."""
