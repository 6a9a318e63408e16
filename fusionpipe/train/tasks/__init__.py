"""Stage 3: per-task labels, losses, predictions and metrics; one module per task.

    >>> from fusionpipe.train.tasks import build_task
    >>> task = build_task("classify", {"label": ["sad", "ang", "sad", "neu"]})
    >>> task.classes
    ['ang', 'neu', 'sad']
    >>> head = task.build_head(in_dim=768)
    >>> sorted(task.metrics(["sad", "ang"], {"label": ["sad", "neu"]}))
    ['accuracy', 'macro_f1']

    base          the protocol every task follows (`Task`), and the head checks
    registry      which tasks there are; the metric, head and option tables derived from them
    asr, multilingual, classify, verify, phoneme    one task each
    ctc           what the CTC tasks share: token vocabulary (characters, phones), loss, greedy decoding,
                  CtcTask (head, loss and predictions of asr and phoneme)
    metrics       WER, CER, PER, accuracy, macro F1, EER over a whole eval set

The trainer uses the same calls for every task: ``build_task(name, train, trials=())``,
``task.build_head(in_dim, **sizes)``, ``task.loss(head, feats, lengths, targets)``,
``task.predict(head, feats, lengths)``, ``task.metrics(preds, targets)``; ``task.to_dict()`` and
`task_from_dict` keep the label maps with a checkpoint (base.py says what each takes).
"""

from fusionpipe.train.tasks.asr import AsrTask
from fusionpipe.train.tasks.base import Task, check_head
from fusionpipe.train.tasks.classify import ClassifyTask
from fusionpipe.train.tasks.ctc import BLANK, SEPARATOR, CharVocab, PhoneVocab, TokenVocab, ctc_loss, greedy_ctc_decode
from fusionpipe.train.tasks.metrics import accuracy, blank_share, cer, cer_per_language, eer, macro_f1, per, wer
from fusionpipe.train.tasks.multilingual import MultilingualTask
from fusionpipe.train.tasks.phoneme import PhonemeTask
from fusionpipe.train.tasks.registry import (COLUMNS, HEADS, HIGHER_IS_BETTER, METRICS, REGISTRY, TASKS, batch_targets,
                                             build_task, head_option_names, head_option_problems, is_metric,
                                             lower_is_better, primary_metric, task_from_dict)
from fusionpipe.train.tasks.verify import VerifyTask
from fusionpipe.trials import Trial, read_trials

__all__ = ["BLANK", "COLUMNS", "HEADS", "HIGHER_IS_BETTER", "METRICS", "REGISTRY", "SEPARATOR", "TASKS", "AsrTask",
           "CharVocab", "ClassifyTask", "MultilingualTask", "PhoneVocab", "PhonemeTask", "Task", "TokenVocab", "Trial",
           "VerifyTask", "accuracy",
           "batch_targets", "blank_share", "build_task", "cer", "cer_per_language", "check_head", "ctc_loss", "eer",
           "greedy_ctc_decode", "head_option_names", "head_option_problems", "is_metric", "lower_is_better",
           "macro_f1", "per", "primary_metric", "read_trials", "task_from_dict", "wer"]
