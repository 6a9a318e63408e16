"""How a set of upstreams is named wherever it appears: run directories, report rows, store descriptions.

    >>> upstream_set_name(["wavlm-base-plus", "whisper-small"])
    'wavlm-base-plus+whisper-small'

A shared module so that stage 2 (a fused view's description), stage 3 (the default run directory),
the analysis and the report spell it the same way.
"""

from __future__ import annotations

from collections.abc import Iterable


def upstream_set_name(upstreams: Iterable[str]) -> str:
    """The upstreams' names joined with "+", in their order (the order is the fusion's input order)."""
    return "+".join(upstreams)
