"""STAGE 1: run each frozen upstream once over a manifest and cache ALL its hidden layers.

    registry            aliases of the upstreams: L, D, frame rate without loading weights
    upstreams           loading through transformers, the batch-independent forward
    front_end           frame arithmetic and the feature extractor (the CPU half of an upstream)
    batch_independence  the modules swapped in so that no utterance depends on its batch
    toys, null_upstream random-weight models (tests), a model-free upstream (bench/extract.py)
    defaults            stage 1's defaults (dtype, batch seconds)
    stage               plan (header checks, frame counts, store order, batches) and extract
    pipeline            the same batches, decoding and writing in helper processes (the GPU default)
    cluster             the same plan on dask.distributed workers

    >>> from fusionpipe.extract.stage import extract                 # doctest: +SKIP
    >>> extract(read_manifest("manifests/demo-train.tsv"), "wavlm-base-plus")  # doctest: +SKIP
"""
