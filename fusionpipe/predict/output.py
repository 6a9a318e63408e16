"""`fusionpipe predict`'s output: one row per input (its id, its audio, the task's outputs), TSV or JSON;
RTTM for a task whose outputs have ``turns`` (the manifest's column: ``start,end,speaker;...``).

A file is whole or absent: rows stream into a temporary file beside it (memory flat in the number of
inputs), renamed over ``--out`` only when every input has its row; an error or a kill midway leaves
``--out`` as it was (the temporary file is named as `fusionpipe.atomic` names its own, so
`remove_leftovers` knows it).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import sys
from pathlib import Path

from fusionpipe.atomic import TEMP_SUFFIX, check_writable, fsync_dir
from fusionpipe.errors import FusionpipeError
from fusionpipe.rttm import format_rttm_line, parse_turns

FORMATS = {".tsv": "one row per input, tab-separated; lists and dicts as JSON", ".json": "a JSON list of rows",
           ".jsonl": "one JSON object per line", ".rttm": "who speaks when (a diarization run's turns)"}


def check_out(out: Path) -> None:
    """Refuse, before any work, an --out whose format is unknown or whose directory cannot be written."""
    if out.suffix not in FORMATS:
        raise FusionpipeError(f"--out {out}: name a {', '.join(FORMATS)} file (" +
                              "; ".join(f"{k}: {v}" for k, v in FORMATS.items()) + ")")
    check_writable(out.parent, "--out")


def cell(value) -> str:
    """A TSV cell: text as it is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def remove_dead_temporaries(path: Path) -> None:
    """Delete the temporary files of ``path`` that a killed predict left (their process is gone); those of a
    predict still writing to the same name are kept."""
    for tmp in path.parent.glob(f".{path.name}.*{TEMP_SUFFIX}"):
        pid = tmp.name[len(path.name) + 2:].split(".")[0]
        if pid.isdigit() and not alive(int(pid)) and tmp.is_file():
            with contextlib.suppress(OSError):
                tmp.unlink()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True


class RowWriter:
    """Rows to ``path`` (whole or absent), or to standard output as TSV when ``path`` is None.

        with RowWriter(Path("out.tsv")) as w:
            w.write({"id": "u1", "path": "a.wav", "label": "sad"})
    """

    def __init__(self, path: Path | None):
        self.path, self.format = path, path.suffix if path else ".tsv"
        self.columns: list[str] | None = None
        self.tmp: Path | None = None
        self.file = sys.stdout

    def __enter__(self) -> RowWriter:
        if self.path is not None:
            remove_dead_temporaries(self.path)
            self.tmp = self.path.parent / f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
            self.file = open(self.tmp, "w", encoding="utf-8")
            if self.format == ".json":
                self.file.write("[")
        return self

    def write(self, row: dict) -> None:
        if self.format == ".tsv":
            if self.columns is None:
                self.columns = list(row)
                self.file.write("\t".join(self.columns) + "\n")
            self.file.write("\t".join(cell(row[c]).replace("\t", " ").replace("\n", " ") for c in self.columns)
                            + "\n")
        elif self.format == ".rttm":
            if "turns" not in row:
                raise FusionpipeError(f"--out {self.path}: RTTM holds who speaks when, and this run's task writes "
                                      f"{', '.join(k for k in row if k not in ('id', 'path'))}; name a .tsv, "
                                      ".json or .jsonl file")
            self.file.write("".join(format_rttm_line(row["id"], t) + "\n"
                                    for t in parse_turns(row["turns"], f"{row['id']} turns")))
        elif self.format == ".json":
            self.file.write(("\n" if self.columns is None else ",\n") + json.dumps(row))
            self.columns = list(row)
        else:
            self.file.write(json.dumps(row) + "\n")
        if self.tmp is None:
            self.file.flush()

    def __exit__(self, kind, error, traceback) -> None:
        if self.tmp is None:
            return
        try:
            try:
                if kind is None:
                    if self.format == ".json":
                        self.file.write("\n]\n")
                    self.file.flush()
                    os.fsync(self.file.fileno())
                self.file.close()
                if kind is None:
                    os.replace(self.tmp, self.path)
                    fsync_dir(self.path.parent)
            finally:
                with contextlib.suppress(OSError):
                    self.tmp.unlink()
        except OSError as e:
            self._refuse_full_disk(e)
            raise
        if isinstance(error, OSError):
            self._refuse_full_disk(error)

    def _refuse_full_disk(self, e: OSError) -> None:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise FusionpipeError(f"--out {self.path}: the disk is full ({e.strerror}); the file is as it was. Free "
                                  "some space (or choose another --out) and rerun") from None
