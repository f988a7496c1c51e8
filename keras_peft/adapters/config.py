"""`AdapterConfig`: what one low-rank adapter is (rank, scale, variant, initialisation).

It is data: `lora` builds one from its arguments, every adapted layer keeps
it, a wrapped model's config, a delta file and a `.keras` file store it as
`to_dict()`, and `AdapterConfig.from_dict` reads it back (older records,
which had only `layer`, `rank` and `alpha`, read as plain LoRA).
"""

from __future__ import annotations

import dataclasses
import math
import numbers

__all__ = ["AdapterConfig", "IMPLEMENTATIONS", "INITS", "VARIANTS"]

VARIANTS = ("lora", "dora")
INITS = ("default", "pissa")
IMPLEMENTATIONS = ("factored", "keras")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(
            f"`{name}` must be one of {', '.join(map(repr, choices))}. Received: "
            f"{name}={value!r}."
        )


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """One adapter's settings.

    Attributes:
        rank: `r`, the adapter's rank.
        alpha: the scale's numerator.
        variant: `"lora"` (`W + s B A`) or `"dora"` (a trained magnitude per
            output column times the normalised direction of `W + s B A`).
        rslora: when True the scale is `alpha / sqrt(rank)` (rank-stabilised,
            Kalajdzievski 2023), otherwise `alpha / rank`.
        dropout: dropout rate on the adapter's input (not on the base path).
        init: `"default"` (A random, B zero) or `"pissa"` (A, B from the top-r
            singular vectors of W, the residual kept in the frozen weight).
        implementation: `"factored"` (keras-peft's layers) or `"keras"`
            (Keras' built-in `enable_lora`).
    """

    rank: int
    alpha: float
    variant: str = "lora"
    rslora: bool = False
    dropout: float = 0.0
    init: str = "default"
    implementation: str = "factored"

    def __post_init__(self):
        rank, alpha = self.rank, self.alpha
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
            raise ValueError(
                "`rank` must be a positive integer (typically 4 to 64). "
                f"Received: rank={rank!r} (type {type(rank).__name__})."
            )
        if (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real)
                or not math.isfinite(alpha) or alpha <= 0):
            raise ValueError(
                "`alpha` must be a positive number or None (None means alpha=rank, "
                f"a scale of 1). Received: alpha={alpha!r} (type {type(alpha).__name__})."
            )
        _check_choice("variant", self.variant, VARIANTS)
        _check_choice("init", self.init, INITS)
        _check_choice("implementation", self.implementation, IMPLEMENTATIONS)
        if not isinstance(self.rslora, bool):
            raise ValueError(f"`rslora` must be True or False. Received: rslora={self.rslora!r}.")
        rate = self.dropout
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= rate < 1:
            raise ValueError(
                f"`dropout` must be a number in [0, 1). Received: dropout={rate!r}.")
        if self.implementation == "keras":
            self._check_keras()

    def _check_keras(self) -> None:
        extras = {k: v for k, v in (("variant", "lora"), ("rslora", False), ("dropout", 0.0),
                                     ("init", "default")) if getattr(self, k) != v}
        if extras:
            given = ", ".join(f"{k}={getattr(self, k)!r}" for k in extras)
            raise ValueError(
                f"Keras' built-in LoRA (implementation='keras') has only rank and alpha; "
                f"{given} need keras-peft's layers: drop implementation='keras'. "
                f"Received: {given}."
            )

    @property
    def scale(self) -> float:
        """`alpha / rank`, or `alpha / sqrt(rank)` with `rslora`."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "rank": int(self.rank), "alpha": float(self.alpha)}

    @classmethod
    def from_dict(cls, record: dict, legacy: str = "keras") -> AdapterConfig:
        """Reads `to_dict()`'s output; a record without `implementation` (written by
        keras-peft before its own adapters) gets `legacy`."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in record.items() if k in fields}
        values.setdefault("implementation", legacy)
        return cls(**values)

    def describe(self) -> str:
        """E.g. `dora r=8 scale=2 (rslora) pissa`, for reports and errors."""
        parts = [self.variant, f"r={self.rank}", f"scale={self.scale:g}"]
        if self.rslora:
            parts.append("(rslora)")
        if self.init != "default":
            parts.append(self.init)
        if self.dropout:
            parts.append(f"dropout={self.dropout:g}")
        if self.implementation != "factored":
            parts.append(f"[{self.implementation}]")
        return " ".join(parts)
