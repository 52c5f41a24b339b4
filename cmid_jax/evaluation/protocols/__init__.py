"""Evaluation protocol registry: one contract per protocol.

`PROTOCOLS` maps a protocol's name (`cmid-evaluate --protocol`, the `protocol` of an eval.jsonl
line) to what owns it: a module (`knn`, `linear`, `finetune`) or, for the dense protocols that
differ only by their `dense.DenseTask`, a `dense_probe.DenseProtocol`. Each provides its options
(`OPTIONS`: a frozen dataclass of its own settings, each with a default and a help line; the
flags of `cmid-evaluate` are made from them), the listing and split of its data (`split`, checked
before the checkpoint is read), its score of a backbone (`run`: the fields of the result line
`evaluation.run.evaluate` appends to eval.jsonl) and, where it has one, its online form that the
train loop runs every `config.eval.every_steps` (`ONLINE`, read by `periodic.PeriodicEvals`). A
new protocol is one module that implements `EvalProtocol` plus one line in `PROTOCOLS`.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Protocol

import ml_collections

from cmid_jax.errors import ConfigError
from cmid_jax.evaluation import dense
from cmid_jax.evaluation.protocols import finetune, knn, linear
from cmid_jax.evaluation.protocols.base import OnlineEval, RunContext
from cmid_jax.evaluation.protocols.dense_probe import DenseProtocol


class EvalProtocol(Protocol):
    """What a protocol provides (module-level names, or attributes)."""

    OPTIONS: type  # Frozen dataclass of its own options, each a `base.option` with a default.
    ONLINE: OnlineEval | None  # Its form in the train loop, if it has one.

    def split(self, data: str, train_fraction: float, seed: int, options: Any) -> Any:
        """`data` listed, checked and split (seeded): no checkpoint is read before it."""

    def run(self, split: Any, options: Any, context: RunContext) -> dict[str, Any]:
        """Scores `context.variables` on `split`; the protocol's fields of the result line."""


PROTOCOLS: dict[str, EvalProtocol] = {
    'knn': knn,
    'linear': linear,
    'finetune': finetune,
    'segmentation': DenseProtocol(dense.SEGMENTATION),
    'change': DenseProtocol(dense.CHANGE),
}


def protocol_module(name: str) -> EvalProtocol:
    """What owns protocol `name`."""
    if name not in PROTOCOLS:
        raise ConfigError(f'protocol must be one of {tuple(PROTOCOLS)}, got {name!r}')
    return PROTOCOLS[name]


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One option name over all protocols: its type, default, help, choices and owners."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None
    protocols: tuple[str, ...]


def option_specs() -> dict[str, OptionSpec]:
    """Every protocol option by name. Protocols that share an option name share its meaning:
    the same type, default and choices (checked here), so one `cmid-evaluate` flag serves them."""
    specs: dict[str, OptionSpec] = {}
    for protocol, module in PROTOCOLS.items():
        hints = typing.get_type_hints(module.OPTIONS)
        for field in dataclasses.fields(module.OPTIONS):
            choices = field.metadata.get('choices')
            spec = OptionSpec(
                field.name,
                _plain_type(hints[field.name]),
                field.default,
                field.metadata.get('help', ''),
                None if choices is None else tuple(choices),
                (protocol,),
            )
            seen = specs.get(field.name)
            if seen is not None:
                if (seen.type, seen.default, seen.choices) != (
                    spec.type,
                    spec.default,
                    spec.choices,
                ):
                    raise TypeError(
                        f'option {field.name!r} of protocol {protocol!r} differs from that of '
                        f'{seen.protocols}: one name, one meaning'
                    )
                spec = dataclasses.replace(seen, protocols=seen.protocols + (protocol,))
            specs[field.name] = spec
    return specs


def _plain_type(hint: Any) -> type:
    """`int`, `float`, `str` or `bool` of a field's annotation (`X | None` -> X)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    plain = args[0] if args else hint
    if plain not in (int, float, str, bool):
        raise TypeError(f'protocol options are int, float, str or bool (or None); got {hint}')
    return plain


def make_options(protocol: str, **options: Any) -> Any:
    """`PROTOCOLS[protocol].OPTIONS(**options)`; an option of another protocol (or of none) is a
    ValueError of one line naming the protocols it belongs to and the ones `protocol` takes."""
    cls = protocol_module(protocol).OPTIONS
    own = tuple(f.name for f in dataclasses.fields(cls))
    for name in options:
        if name not in own:
            specs = option_specs()
            takes = f'takes {", ".join(own)}' if own else 'takes no options'
            where = (
                f'is an option of {" / ".join(specs[name].protocols)}, not of {protocol}'
                if name in specs
                else "is no evaluation protocol's option"
            )
            raise ConfigError(f'{name!r} {where} ({protocol} {takes})')
    return cls(**options)


def online_evals(config: ml_collections.ConfigDict) -> dict[str, OnlineEval]:
    """{protocol: its online form} of the protocols the config asks the train loop to run."""
    return {
        name: module.ONLINE
        for name, module in PROTOCOLS.items()
        if module.ONLINE is not None and module.ONLINE.enabled(config)
    }


__all__ = [
    'PROTOCOLS',
    'EvalProtocol',
    'OnlineEval',
    'OptionSpec',
    'RunContext',
    'make_options',
    'online_evals',
    'option_specs',
    'protocol_module',
]
