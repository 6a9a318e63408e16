"""STAGE 1: run each frozen upstream once over a manifest and cache ALL its hidden layers.

    upstreams  the registry, loading through transformers, the batch-independent forward
    run        plan (header checks, frame counts, store order, batches) and extract
    pipeline   the same batches, decoding and writing in helper processes (the GPU default)
    cluster    the same plan on dask.distributed workers

    >>> from fusionpipe.extract import extract                       # doctest: +SKIP
    >>> extract(read_manifest("manifests/demo-train.tsv"), "wavlm-base-plus")  # doctest: +SKIP
"""
