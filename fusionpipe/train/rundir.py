"""Stage 3's artifact: the run directory, its one reader and writer (as store.py is for stores).

    >>> run = RunDir("runs/classify-toy-wavlm+toy-whisper")        # doctest: +SKIP
    >>> cfg = run.config()               # config.json, options saved under their older names mapped
    >>> run.results("hconv-concat")["dev"]                          # doctest: +SKIP

Layout::

    <run>/config.json                the TrainConfig, as given (--resume must give the same: `config_changes`)
    <run>/task.json                  labels (vocabulary, classes, speakers) from the train manifest
    <run>/last.pt                    the last checkpoint: its step, the data position and every variant's
                                     parameters, optimizer and RNG state (--resume continues exactly)
    <run>/test.json                  {variant: metrics} on a recipe's test stores (`fusionpipe ablate`)
    <run>/eval-<label>.json          {variant: metrics} of `fusionpipe evaluate` on <label>
    <run>/eval-<label>-<variant>.rttm  a diarize run's predicted turns there (`fusionpipe.rttm`)
    <run>/<variant>/best.pt          parameters at the best dev metric, with those metrics
    <run>/<variant>/log.csv          step, loss, dev metrics
    <run>/<variant>/results.json

A variant is one (fusion, merge) of the run, once per seed of its ``seeds``: its directory is named
`variant_name` (hconv-concat, or hconv-concat@s1 with seeds). Every file but log.csv is written whole
or not at all (`fusionpipe.atomic`); checkpoints are read without running code (`load_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from fusionpipe.atomic import write_json
from fusionpipe.errors import FusionpipeError
from fusionpipe.rttm import write_rttm
from fusionpipe.train.checkpoint import load_checkpoint, save_checkpoint
from fusionpipe.train.config import TrainConfig

SEED_MARK = "@s"  # hconv-concat@s1: the variant hconv-concat trained with seed 1 (one of a run's `seeds`)
# config.json fields renamed since: the old name -> the field it is now (runs saved before still evaluate and resume)
LEGACY_FIELDS = {"head": "head_options", "interface": "interface_options"}


def variant_name(fusion: str, merge: str, seed: int | None = None) -> str:
    return f"{fusion}-{merge}" + ("" if seed is None else f"{SEED_MARK}{seed}")


def split_seed(name: str) -> tuple[str, int | None]:
    """'hconv-concat@s1' -> ('hconv-concat', 1); a name without a seed -> (name, None)."""
    base, mark, seed = name.rpartition(SEED_MARK)
    return (base, int(seed)) if mark and seed.isdigit() else (name, None)


def variant_grid(fusion: list[str], merge: list[str], seeds: list[int] | None = None) -> list[tuple[str, str, int | None]]:
    """(fusion, merge, seed) of every variant a run trains, in its order: each fusion x merge, once per seed
    of ``seeds``; without seeds, seed None (the variant trains with the run's one ``seed``)."""
    return [(f, m, s) for f in fusion for m in merge for s in (seeds or [None])]


def variants_of(cfg: TrainConfig) -> list[tuple[str, str, int | None]]:
    """(fusion, merge, seed) of every variant the run of ``cfg`` trains (`variant_grid`)."""
    return variant_grid(cfg.fusion, cfg.merge, cfg.seeds)


def variant_names(cfg: TrainConfig) -> list[str]:
    """The directory names of the variants the run of ``cfg`` trains, in its order."""
    return [variant_name(*v) for v in variants_of(cfg)]


def read_config_json(path: str | Path) -> dict:
    """A saved config.json as a dict of TrainConfig fields: the one place older field names are mapped
    (`LEGACY_FIELDS`), so that loading, --resume and a recipe's rerun compare the same thing."""
    try:
        saved = json.loads(Path(path).read_text())
    except ValueError as e:
        raise FusionpipeError(f"{path} is not a fusionpipe training config ({e})") from None
    if not isinstance(saved, dict):
        raise FusionpipeError(f"{path} is not a fusionpipe training config (a JSON {type(saved).__name__})")
    for old, new in LEGACY_FIELDS.items():
        if old in saved and new not in saved:
            saved[new] = saved.pop(old)
    return saved


class RunDir:
    """A run directory of `fusionpipe train`: every file of it is read and written here."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ---- the run ----------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def last_path(self) -> Path:
        return self.path / "last.pt"

    def exists(self) -> bool:
        """Whether a run was started here (its config.json is written before the first step)."""
        return self.config_path.is_file()

    def require(self) -> None:
        """Refuse a directory that is not a training run, saying what to give."""
        if not self.exists() or not (self.path / "task.json").is_file():
            raise FusionpipeError(f"{self.path} is not a training run (no config.json / task.json); give a directory "
                                  "`fusionpipe train --out` wrote, or train one with `fusionpipe train`")

    def saved_config(self) -> dict:
        """config.json as saved, its fields under today's names (`read_config_json`)."""
        return read_config_json(self.config_path)

    def config(self) -> TrainConfig:
        """config.json as a checked TrainConfig (its older field names mapped: `read_config_json`)."""
        path = self.config_path
        try:
            cfg = TrainConfig(**read_config_json(path))
        except TypeError as e:  # other fields than a TrainConfig's
            raise FusionpipeError(f"{path} is not a fusionpipe training config ({e})") from None
        try:  # an edited file (hidden: 1e12) is refused here, not by the allocator
            cfg.check_settings()
        except FusionpipeError as e:
            raise FusionpipeError(f"{path}: {e}; restore the file, or train again into another --out") from None
        return cfg

    def write_config(self, cfg: TrainConfig) -> None:
        write_json(self.config_path, dataclasses.asdict(cfg))

    def task(self, trials=()):
        """The task of task.json (labels of the train manifest); ``trials`` for verify are eval data."""
        from fusionpipe.train.tasks import task_from_dict

        path = self.path / "task.json"
        try:
            return task_from_dict(json.loads(path.read_text()), trials)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise FusionpipeError(f"{path} is not a task fusionpipe wrote ({type(e).__name__}: {e}); "
                                  "train the run again into another --out") from None

    def has_task(self) -> bool:
        return (self.path / "task.json").is_file()

    def write_task(self, task) -> None:
        write_json(self.path / "task.json", task.to_dict(), indent=None)

    def load_last(self) -> dict:
        return load_checkpoint(self.last_path)

    def save_last(self, state: dict) -> None:
        save_checkpoint(state, self.last_path)

    def older_checkpoints(self) -> list[str]:
        """Per-variant last.pt files of an older fusionpipe (which may stand at different steps)."""
        return sorted(str(p) for p in self.path.glob("*/last.pt"))

    def test(self) -> dict:
        """test.json: {variant: metrics} on the test stores; {} before they were scored."""
        path = self.path / "test.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def write_test(self, metrics: dict[str, dict]) -> None:
        write_json(self.path / "test.json", metrics)

    def write_eval(self, label: str, metrics: dict[str, dict]) -> Path:
        """eval-<label>.json: what `fusionpipe evaluate` scored on <label>."""
        path = self.path / f"eval-{label}.json"
        write_json(path, metrics)
        return path

    def write_rttm(self, label: str, variant: str, turns: dict) -> Path:
        """eval-<label>-<variant>.rttm: a diarize variant's predicted turns on <label>, recording id -> turns."""
        return write_rttm(self.path / f"eval-{label}-{variant}.rttm", turns)

    # ---- its variants -------------------------------------------------------------------------------
    def variant(self, name: str) -> Path:
        """The directory of variant ``name``."""
        return self.path / name

    def best_path(self, name: str) -> Path:
        return self.variant(name) / "best.pt"

    def log_path(self, name: str) -> Path:
        return self.variant(name) / "log.csv"

    def load_best(self, name: str) -> dict:
        return load_checkpoint(self.best_path(name))

    def save_best(self, name: str, state: dict) -> None:
        save_checkpoint(state, self.best_path(name))

    def results(self, name: str) -> dict | None:
        """results.json of a variant; None while it has not finished."""
        path = self.variant(name) / "results.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def write_results(self, name: str, results: dict) -> None:
        write_json(self.variant(name) / "results.json", results)

    def finished(self, names: list[str]) -> bool:
        """Whether every variant of ``names`` has its results.json."""
        return all((self.variant(n) / "results.json").is_file() for n in names)

    def has_test(self, names: list[str]) -> bool:
        """Whether test.json scores every variant of ``names``."""
        test = self.test()
        return bool(test) and all(n in test for n in names)

    def stuck_variants(self, names: list[str]) -> list[str]:
        """The variants of ``names`` whose results.json says they ended on the CTC blank plateau."""
        return [n for n in names if ((self.results(n) or {}).get("plateau") or {}).get("stuck")]
