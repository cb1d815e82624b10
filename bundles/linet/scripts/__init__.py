"""The LINet bundle has no code of its own: its configs build :mod:`lesiondiffusion.pipelines.linet`
(inference), :mod:`lesiondiffusion.networks.linet` (latent prepare-batch, loss) and :mod:`lesiondiffusion.training`."""
