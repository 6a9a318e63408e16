"""STAGE 3: train only the interface and the task head, from the cache.

    interfaces  the merge front and the interface over the layer axis (HConv, weighted sum, Gumbel, ...)
    heads       the task heads (SUPERB's BiLSTM-CTC, classifier, x-vector, ...)
    tasks       labels, losses, metrics per task; which metric picks the best checkpoint
    loop        TrainConfig, train (every variant in one pass), evaluate
    ddp         the same under torchrun
"""

from fusionpipe.train.loop import TrainConfig, evaluate, train, variant_name

__all__ = ["TrainConfig", "evaluate", "train", "variant_name"]
