"""Which parameters share a step count, known without reading the counters.

The fused step groups parameters by step count, and the counters live on the device (reading
one waits for a GPU). ``CountTokens`` keeps one host-side token per parameter instead: equal
tokens, equal counts. Parameters updated in the same steps since their counters were created
share a token; a counter the optimizer did not make or advance (a loaded state dict) is read
once. A fused layout's steady-state step notes its parameters as moved together instead of
writing a token per parameter; the next reader gives each such list a fresh token.
"""

from __future__ import annotations

import itertools
from typing import Any

from torch import Tensor

__all__ = ["CountTokens"]


class CountTokens:
    def __init__(self) -> None:
        # id(param) -> (param, token): the parameter is kept to tell a reused id apart.
        self._tokens: dict[int, tuple[Tensor, Any]] = {}
        self._ids = itertools.count()
        self._moved_together: dict[int, list[Tensor]] = {}

    def of(self, params: list[Tensor], state: dict[Tensor, dict[str, Any]]) -> list[Any]:
        """One token per parameter standing for its step count (``state[p]["step"]``)."""
        for moved in self._moved_together.values():
            self.advance(moved, [None] * len(moved))  # they shared one token
        self._moved_together.clear()
        out: list[Any] = []
        unknown: list[int] = []
        for i, p in enumerate(params):
            entry = self._tokens.get(id(p))
            if entry is not None and entry[0] is p:
                out.append(entry[1])
            else:
                out.append(None)
                unknown.append(i)
        if unknown:
            counts = [float(state[params[i]]["step"]) for i in unknown]
            for i, k in zip(unknown, counts):
                out[i] = ("count", k)
                self._tokens[id(params[i])] = (params[i], out[i])
        return out

    def created(self, params: list[Tensor]) -> None:
        """New counters, all 0: one token for them."""
        token = ("new", next(self._ids))
        for p in params:
            self._tokens[id(p)] = (p, token)

    def advance(self, params: list[Tensor], tokens: list[Any]) -> None:
        """After an update of ``params`` (applied or skipped: all or none of them moved)."""
        fresh: dict[Any, int] = {}
        for p, token in zip(params, tokens):
            new = fresh.get(token)
            if new is None:
                new = fresh[token] = next(self._ids)
            self._tokens[id(p)] = (p, new)

    def moved_together(self, key: int, params: list[Tensor]) -> None:
        """A fused layout's parameters (one count) took a step together."""
        self._moved_together[key] = params
