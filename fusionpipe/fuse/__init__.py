"""STAGE 2: align the stores of one manifest across frames and layers, and merge them, lazily.

    align    the rule: every store to a common (L, T) by end-exact linear interpolation
    view     open_fused -> FusedView: stores matched by utterance id, aligned, merged (add/concat);
             its reads, one per kind of result: read_stacks, read_merged, read_compact
    runs     which utterances one contiguous read serves (the grouping every reader shares)
    memory   the float32 batch buffers, reused once a batch is gone
    compact  a lossy store's stack sent to the device as its codes, expanded there
    lazy     the Dask side: to_dask, layer_stats
    write    a merged view materialised as a store
    loader   length-bucketed batches of a view for stage 3 (and its DDP shards)

    >>> from fusionpipe.fuse import open_fused                       # doctest: +SKIP
    >>> view = open_fused(["cache/demo-train/toy-wavlm.zarr", "cache/demo-train/toy-whisper.zarr"], merge="concat")
"""

from fusionpipe.fuse.loader import make_loader, recorded_manifest
from fusionpipe.fuse.view import FusedView, ViewSpec, open_fused

__all__ = ["FusedView", "ViewSpec", "make_loader", "open_fused", "recorded_manifest"]
