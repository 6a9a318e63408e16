"""STAGE 2: align the stores of one manifest across frames and layers, and merge them, lazily.

    view    open_fused -> FusedView: stores matched by utterance id, aligned, merged (add/concat);
            its reads: read_stacks (per store), read_merged, read_compact (lossy stores as codes)
    runs    which utterances one contiguous read serves (the grouping every reader shares)
    lazy    the Dask side: to_dask, layer_stats;  write: a merged view as a store
    memory, compact   the batch buffers, and a lossy stack sent to the device as its codes
    loader  length-bucketed batches of a view for stage 3 (and its DDP shards)

    >>> from fusionpipe.fuse import open_fused                       # doctest: +SKIP
    >>> view = open_fused(["cache/demo-train/toy-wavlm.zarr", "cache/demo-train/toy-whisper.zarr"], merge="concat")
"""

from fusionpipe.fuse.loader import make_loader, recorded_manifest
from fusionpipe.fuse.view import FusedView, ViewSpec, open_fused

__all__ = ["FusedView", "ViewSpec", "make_loader", "open_fused", "recorded_manifest"]
