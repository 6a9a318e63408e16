"""The feature store's codecs, one table: name -> the zarr codecs of a chunk, a line of help, the bytes it takes.

    >>> CODECS["int8-std08"].ratio, CODECS["int8-std08"].lossy
    (0.324, True)

`FeatureStore.create` builds a store's chunk codecs from it, `fusionpipe extract --help` lists it
(`help_text`), the disk estimates read its measured ratios (`expected_bytes`), and README.md points
here instead of keeping a copy. A codec added to the table is a codec everywhere.

Every chunk ends in `checksum` (zarr v3's crc32c), whatever the codec: `compressors` appends it.
The lossy ones serialize with `quantize.Quantize` (int8 codes with their steps inside each chunk)
in place of zarr's plain ``bytes``, then zstd; docs/decisions.md tells how they were chosen.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Codec:
    """One store representation: its zarr codecs' settings, and ``ratio``, store bytes / raw float16 bytes
    of `hidden` measured by bench/storage.py on real pretrained Whisper-base activations of the bundled
    corpus (docs/benchmarks.md; random-weight models compress differently, real ones of other families
    similarly). Settings, not codec objects, so that reading the table (the CLI's help) imports no zarr."""

    help: str
    ratio: float
    compressor: tuple[str, dict] | None  # the bytes->bytes codec before the checksum: (zstd or blosc, settings)
    quantize: dict | None = None         # quantize.Quantize's settings (the array->bytes codec); None: plain bytes

    @property
    def lossy(self) -> bool:
        return self.quantize is not None


ZSTD = ("zstd", {"level": 3})

# Lossless ratios: zstd-3 1.12x at 620 MB/s, blosc byte-shuffle 1.12x, bit-shuffle 1.06x, lz4 1.00x
# (shared/design.md); bench/extract.py re-measures their speed.
CODECS: dict[str, Codec] = {
    "zstd": Codec("zstd level 3 (lossless, the default)", 0.893, ZSTD),
    "blosc-zstd": Codec("blosc zstd-3, byte shuffle (lossless)", 0.89,
                        ("blosc", {"cname": "zstd", "clevel": 3, "shuffle": "shuffle"})),
    "blosc-zstd-bitshuffle": Codec("blosc zstd-3, bit shuffle (lossless)", 0.94,
                                   ("blosc", {"cname": "zstd", "clevel": 3, "shuffle": "bitshuffle"})),
    "blosc-lz4": Codec("blosc lz4-5, byte shuffle (lossless)", 1.0,
                       ("blosc", {"cname": "lz4", "clevel": 5, "shuffle": "shuffle"})),
    "none": Codec("no compression (lossless)", 1.0, None),
    "int8": Codec("int8 codes, step = max|x| / 127 per (layer, channel), then zstd", 0.419, ZSTD, {}),
    "int8-std08": Codec("int8 codes, step = 0.08 x channel std, layers predicted, then zstd", 0.324, ZSTD,
                        {"step": 0.08, "predict_layers": True}),
    "int8-std10": Codec("int8 codes, step = 0.10 x channel std, layers predicted, then zstd", 0.307, ZSTD,
                        {"step": 0.10, "predict_layers": True}),
    "int8-std20": Codec("int8 codes, step = 0.20 x channel std, layers predicted, then zstd", 0.265, ZSTD,
                        {"step": 0.20, "predict_layers": True}),
}
LOSSY = tuple(name for name, c in CODECS.items() if c.lossy)
DEFAULT_CODEC = "zstd"
# for large corpora: 0.32x the fp16 bytes, within the fp16 seed spread on every variant bench/storage.py
# trains (asr and classify, hconv and weighted sum, 5 seeds on real Whisper-base): docs/decisions.md
RECOMMENDED_LOSSY = "int8-std08"


def checksum():
    """The last bytes->bytes codec of every chunk (zarr v3's crc32c): bench/extract.py measures its cost."""
    from zarr.codecs import Crc32cCodec

    return Crc32cCodec()


def compressors(codec: str) -> list:
    """The bytes->bytes chunk codecs of `codec`, ending in the checksum."""
    from zarr.codecs import BloscCodec, ZstdCodec

    spec = CODECS[codec].compressor
    first = [] if spec is None else [{"zstd": ZstdCodec, "blosc": BloscCodec}[spec[0]](**spec[1])]
    return [*first, checksum()]


def serializer(codec: str):
    """The array->bytes codec of `codec`: a `Quantize` for the lossy ones, zarr's default otherwise."""
    from fusionpipe.quantize import Quantize

    settings = CODECS[codec].quantize
    return "auto" if settings is None else Quantize(**settings)


def expected_bytes(codec: str, total_frames: float, num_layers: int, hidden_size: int, dtype: str = "float16") -> int:
    """About how many bytes a store of this shape takes on disk with `codec` (measured ratios)."""
    raw = total_frames * num_layers * hidden_size * 2  # the ratios are to float16
    return int(raw * CODECS[codec].ratio * (2 if dtype == "float32" and not CODECS[codec].lossy else 1))


def help_text() -> str:
    """The --codec help: every codec, the lossy ones with how much smaller than float16 they are."""
    lossless = [name + (" (default)" if name == DEFAULT_CODEC else "") for name in CODECS if name not in LOSSY]
    lossy = [f"{name} ({1 / CODECS[name].ratio:.1f}x)" for name in LOSSY]
    return (f"lossless: {', '.join(lossless)}; lossy int8 codes (smaller than float16): {', '.join(lossy)}; "
            f"for large corpora: {RECOMMENDED_LOSSY} (docs/decisions.md; the table: fusionpipe/codecs.py)")
