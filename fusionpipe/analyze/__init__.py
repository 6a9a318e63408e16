"""ANALYSIS: what the layers say, read from what the stages left on disk (stores and runs).

    cka   how alike the layers of the upstreams are: linear CKA on a sample of aligned frames (stores)
    use   which layers each trained interface uses: its weights, Gumbel shares, and a layer knockout (runs)

Reads stage 2's view and stage 3's runs; nothing in the stages imports it.
"""

from fusionpipe.analyze.cka import Similarity, layer_similarity, read_similarity, write_similarity

__all__ = ["Similarity", "layer_similarity", "read_similarity", "write_similarity"]
