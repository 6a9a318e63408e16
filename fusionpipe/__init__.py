"""fusionpipe: model and layer fusion of frozen speech foundation models.

Stage 1 (extract) caches every hidden layer of each frozen upstream in Zarr,
stage 2 (fuse) aligns and merges the caches lazily, stage 3 (train) fits only
the fusion interface and the task head on top.
"""

__version__ = "0.1.0"
