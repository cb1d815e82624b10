"""The LMNet bundle has no code of its own: its configs build :mod:`lesiondiffusion.pipelines.lmnet`
(inference), :mod:`lesiondiffusion.pipelines.mask_inputs` (input transforms) and :mod:`lesiondiffusion.training`
(the training data split)."""
