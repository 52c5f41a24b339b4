"""Rematerialisation of backbone blocks (`model.remat`): memory for recomputation.

'none' keeps every intermediate the backward pass needs. 'dots' keeps only the outputs of the
blocks' matmuls and convolutions (weights times activations, no batch dimensions: not the attention
score or value products) and recomputes norms, activations, softmax and attention in the backward
pass. 'full' keeps only each block's input and recomputes the whole block. Parameter names do not
change: `nn.remat` keeps the module name.

'auto' (the default of `config_base`) is not a policy: the run resolves it on its device before the
step is built, to the lightest policy whose compiled step fits (`cmid_jax.perf.aot.choose_remat`).
Networks built without that (evaluation, export, a state's shapes) use `static(policy)`: 'none'.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

POLICIES = ('none', 'dots', 'full')
CHOICES = ('auto', *POLICIES)


def _matmul_and_conv_outputs(prim, *args, **params) -> bool:
    if prim.name == 'conv_general_dilated':
        return True
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params)


def check(policy: str) -> None:
    if policy == 'auto':
        raise ValueError(
            "model.remat='auto' must be resolved on the device first "
            '(cmid_jax.perf.aot.choose_remat); the policies are ' + ', '.join(POLICIES)
        )
    if policy not in POLICIES:
        raise ValueError(f'model.remat={policy!r}; expected one of {CHOICES}')


def static(policy: str) -> str:
    """`policy`, with an unresolved 'auto' as 'none': for networks built outside a training run
    (a forward pass keeps nothing for a backward pass; shapes and names do not depend on it)."""
    return 'none' if policy == 'auto' else policy


def block(
    module_class: type[nn.Module], policy: str, static_argnums: Sequence[int] = ()
) -> type[nn.Module]:
    """`module_class` rematerialised under `policy`; static_argnums count `self` as 0."""
    check(policy)
    if policy == 'none':
        return module_class
    saveable = {'dots': _matmul_and_conv_outputs, 'full': jax.checkpoint_policies.nothing_saveable}[
        policy
    ]
    return nn.remat(module_class, policy=saveable, static_argnums=tuple(static_argnums))
