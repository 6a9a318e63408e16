"""What a value of an interface or head option may be: the rules the option tables (interfaces.py
`REGISTRY`, heads.py `option_rule`) attach to each option, checked before any data is read, from the command
line, a config.json and a recipe alike (`TrainConfig.check_settings`, ablate/recipe.py).

    >>> value_problem(whole(1), -4)
    'expected a whole number from 1 to 1048576, e.g. 64; got -4'
    >>> value_problem(BOOL, True) is None
    True
"""

from __future__ import annotations

import math
from typing import NamedTuple

# No layer of an interface or head is this wide; a larger value is a typo, and would be an allocator
# traceback once built (the parameter count is checked against memory when a head is built, `tasks.base.check_head`).
MAX_SIZE = 2**20


class Rule(NamedTuple):
    """``kind``: "bool", "whole" or "real"; a number must lie in [low, high) (``open_low``: (low, high))."""

    kind: str
    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False


BOOL = Rule("bool")


def whole(low: int | None = None, high: int = MAX_SIZE) -> Rule:
    """Whole numbers from ``low`` to ``high`` inclusive (no low bound: any sign, e.g. a layer index)."""
    return Rule("whole", -math.inf if low is None else low, high + 1)


def real(low: float = -math.inf, high: float = math.inf, open_low: bool = False) -> Rule:
    return Rule("real", low, high, open_low)


def value_problem(rule: Rule, value) -> str | None:
    """What is wrong with ``value`` under ``rule``, or None when it is fine."""
    if rule.kind == "bool":
        return None if isinstance(value, bool) else f"expected true or false; got {value!r}"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if rule.kind == "whole":
        if not isinstance(value, int) or isinstance(value, bool) or not rule.low <= value < rule.high:
            if rule.low > -math.inf:
                span, example = f"from {int(rule.low)} to {int(rule.high) - 1}", int(min(64, rule.high - 1))
            else:  # an index: negative ones count from the end
                span, example = f"up to {int(rule.high) - 1}", -1
            return f"expected a whole number {span}, e.g. {example}; got {value!r}"
        return None
    low_ok = number and (value > rule.low if rule.open_low else value >= rule.low)
    if not (number and low_ok and value < rule.high and math.isfinite(value)):
        low = "" if rule.low == -math.inf else f"{'>' if rule.open_low else '>='} {rule.low:g}"
        high = "" if rule.high == math.inf else f"< {rule.high:g}"
        return f"expected a number {' and '.join(x for x in (low, high) if x) or '(finite)'}; got {value!r}"
    return None
