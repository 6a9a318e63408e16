"""fusionpipe: model and layer fusion of frozen speech foundation models.

Stage 1 (extract) caches every hidden layer of each frozen upstream in Zarr,
stage 2 (fuse) aligns and merges the caches lazily, stage 3 (train) fits only
the fusion interface and the task head on top.
"""

__version__ = "0.1.0"


def load(run, variant: str | None = None, device: str = "auto"):
    """A trained run as one torch module: 16 kHz waveforms in, the task's output out.

        >>> import fusionpipe, torch
        >>> model = fusionpipe.load("runs/demo")              # doctest: +SKIP
        >>> model([torch.randn(16000)])                       # doctest: +SKIP

    ``variant``: default, the run's best by its selection metric. `fusionpipe.predict.model` says how the
    module repeats the cache's numbers. Imported here lazily: ``import fusionpipe`` stays cheap.
    """
    from fusionpipe.predict import model

    return model.load(run, variant, device)
