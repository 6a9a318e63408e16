"""STAGE 3: train only the interface and the task head, from the cache.

    interfaces  the merge front and the interface over the layer axis (HConv, weighted sum, Gumbel, ...)
    heads       the task heads (SUPERB's BiLSTM-CTC, classifier, x-vector, ...)
    tasks       labels, losses, metrics per task; which metric picks the best checkpoint
    augment     random crops and SpecAugment masks of the fused features
    config      TrainConfig: every setting of a run, checked before any data is read
    loop        train (every variant in one pass), evaluate
    checkpoint  last.pt and best.pt, written whole, read without running code
    log         log.csv per variant (and TensorBoard when installed)
    defaults    what `fusionpipe train` fills in: the demo preset, the task a manifest supports
    ddp         the same under torchrun
"""

from fusionpipe.train.config import TrainConfig, variant_name
from fusionpipe.train.loop import evaluate, train

__all__ = ["TrainConfig", "evaluate", "train", "variant_name"]
