"""Stage 1's defaults, in one place: `extract`, the cluster client, the CLI and the recipes read them.

The codec's default is the codecs table's (`codecs.DEFAULT_CODEC`). This module imports nothing heavy,
so the CLI can show these in its help without loading torch.
"""

import os

DTYPE = "float16"    # storage dtype: fp16 halves the cache; a model whose activations overflow it is refused
MAX_SECONDS = 160.0  # padded audio seconds per batch (bench/extract.py)
IO_THREADS = min(8, max(2, os.cpu_count() or 2))  # threads reading audio headers and decoding audio
