"""Using a trained run: its upstreams, stage 2's alignment and a variant's interface and head as one torch
module, on raw audio (no store needed).

    model   `load` -> TrainedModel: waveforms in, the task's output out (`fusionpipe.load`)
    run     `predict`: audio files or a manifest streamed through it in blocks, one output row per input
    output  the output file (TSV / JSON / JSON lines), whole or absent
"""

from fusionpipe.predict.model import TrainedModel, load
from fusionpipe.predict.run import Prediction, predict

__all__ = ["Prediction", "TrainedModel", "load", "predict"]
