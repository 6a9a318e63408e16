"""STAGE 3: train only the interface and the task head, from the cache.

    interfaces  the merge front and the interface over the layer axis (HConv, weighted sum, Gumbel, ...)
    heads       the task heads (SUPERB's BiLSTM-CTC, classifier, x-vector, ...)
    tasks       labels, losses, metrics per task; which metric picks the best checkpoint
    augment     random crops and SpecAugment masks of the fused features
    config      TrainConfig: every setting of a run, checked before any data is read
    rundir      the run directory: its one reader and writer (config, task, checkpoints, results, variant names)
    variant     one (fusion, merge, seed): its model, optimizer and random stream, built from its seed
    loop        train: every variant in one pass, its state in one object
    evaluation  the evaluation loop (dev metrics, a finished run's scores, the analysis's knockout)
    checkpoint  last.pt and best.pt, written whole, read without running code
    log         log.csv per variant (and TensorBoard when installed)
    defaults    what `fusionpipe train` fills in: the demo preset, the task a manifest supports
    ddp         the same under torchrun
"""

from fusionpipe.train.config import TrainConfig
from fusionpipe.train.evaluation import evaluate
from fusionpipe.train.loop import train
from fusionpipe.train.rundir import RunDir, variant_name

__all__ = ["RunDir", "TrainConfig", "evaluate", "train", "variant_name"]
