"""Reward functions for GRPO, and how ``--reward module:function`` is loaded and checked.

A reward is ``fn(prompt: str, completion: str, row: dict) -> float`` (``row``: the prompt's JSONL object,
so it can carry an answer). Built in (``gemmaforge grpo --reward gemmaforge.rl.rewards:exact_match``):

* ``exact_match``: 1.0 when the completion, stripped, equals ``row["answer"]`` (as a string), else 0.0;
* ``contains_answer``: 1.0 when ``row["answer"]`` occurs in the completion;
* ``regex_format``: 1.0 when the stripped completion fully matches ``row["format"]`` (a regex), or by
  default "a sentence ending with a full stop";
* ``has_number``: 1.0 when the completion holds a number (a toy verifiable reward);
* ``ends_with_period``: 1.0 when the stripped completion ends with ".".
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import re
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, DataError

DEFAULT_FORMAT = r"[^\n]*\S[^\n]*\."


def _answer(row: dict) -> str:
    if "answer" not in row:
        raise KeyError('the prompt row has no "answer" field')
    return str(row["answer"]).strip()


def exact_match(prompt: str, completion: str, row: dict) -> float:
    return float(completion.strip() == _answer(row))


def contains_answer(prompt: str, completion: str, row: dict) -> float:
    return float(_answer(row) in completion)


def regex_format(prompt: str, completion: str, row: dict) -> float:
    return float(re.fullmatch(row.get("format", DEFAULT_FORMAT), completion.strip(), re.DOTALL) is not None)


def has_number(prompt: str, completion: str, row: dict) -> float:
    return float(re.search(r"\d", completion) is not None)


def ends_with_period(prompt: str, completion: str, row: dict) -> float:
    return float(completion.strip().endswith("."))


def load_reward(spec: str) -> Callable:
    """``module:function`` (or ``path/to/file.py:function``) -> the function; one ``ConfigError`` line when it
    cannot be imported or is not callable."""
    if not isinstance(spec, str) or spec.count(":") < 1 or not spec.rsplit(":", 1)[1]:
        raise ConfigError(f"--reward {spec}: expected module:function (e.g. gemmaforge.rl.rewards:exact_match)")
    mod_name, fn_name = spec.rsplit(":", 1)
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise ConfigError(f"--reward {spec}: no such file {mod_name}")
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the user's module raises on import: one line
        raise ConfigError(f"--reward {spec}: cannot import {mod_name} ({type(e).__name__}: {e})") from None
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise ConfigError(f"--reward {spec}: {mod_name} has no attribute {fn_name!r}")
    if not callable(fn):
        raise ConfigError(f"--reward {spec}: {mod_name}.{fn_name} is not callable")
    return fn


def call_reward(fn: Callable, prompt: str, completion: str, row: dict, where: str, name: str = "reward") -> float:
    """``fn(prompt, completion, row)`` as a finite float; a raise or a non-number is one ``DataError``
    naming the reward and the prompt's ``file:line``."""
    try:
        v = fn(prompt, completion, row)
    except Exception as e:  # noqa: BLE001 - the user's reward failing: one line naming the row
        raise DataError(f"{where}: the reward {name} raised {type(e).__name__}: {e}") from None
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        try:
            import torch

            if isinstance(v, torch.Tensor) and v.numel() == 1 and v.dtype.is_floating_point:
                v = float(v)
        except ImportError:
            pass
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        raise DataError(f"{where}: the reward {name} returned {v!r} ({type(v).__name__}), not a finite number")
    return float(v)
