"""Train state (one plain pytree) and the jitted CMID train step."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from cmid_jax import losses, objective, optim
from cmid_jax.models import cmid
from cmid_jax.models.heads import l2_normalize


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """The CMID train step of one resolved config, and what it is built from: the networks, the
    optimizer and the schedules. `init_state` makes the state it steps; calling it steps."""

    nets: cmid.Networks
    tx: optax.GradientTransformation
    lr_fn: object
    schedule: optim.Schedule
    config: ml_collections.FrozenConfigDict

    @classmethod
    def create(
        cls,
        config: ml_collections.FrozenConfigDict,
        schedule: optim.Schedule | None = None,
        platform: str | None = None,
    ) -> TrainStep:
        """The step of `config`, resolved by `cmid_jax.config_resolve.resolve`.

        `schedule` None: `config.total_steps` and `config.steps_per_epoch`. `platform` ('cuda',
        'tpu', 'cpu'; None = this machine's) is the one the step will be lowered for, which picks
        the attention implementation.
        """
        if not isinstance(config, ml_collections.FrozenConfigDict):
            raise TypeError('TrainStep.create takes the frozen config of config_resolve.resolve')
        schedule = schedule or optim.Schedule(config.total_steps, config.steps_per_epoch)
        o = config.optim
        lr_fn = optim.learning_rate_fn(
            schedule,
            o.base_lr * config.batch_size / 256,
            o.min_lr,
            o.warmup_epochs,
            o.warmup_factor,
        )
        return cls(
            nets=cmid.build_networks(config, platform),
            tx=optim.adan(lr_fn, o.weight_decay),
            lr_fn=lr_fn,
            schedule=schedule,
            config=config,
        )

    def init_state(self, rng: jax.Array) -> dict:
        """Student, identical teacher, Adan state, a random unit-norm queue and a zero centre."""
        k_model, k_queue = jax.random.split(rng)
        params, batch_stats = cmid.init_student(self.nets, k_model, self.config.data.image_size)
        teacher_params, teacher_batch_stats = cmid.teacher_from_student(params, batch_stats)
        m = self.config.model
        # Each key (row) is unit-norm; the official code normalised along the wrong axis (Q3).
        queue = l2_normalize(jax.random.normal(k_queue, (self.config.loss.queue_size, m.proj_dim)))
        return {
            'step': jnp.zeros((), jnp.int32),
            'nonfinite_steps': jnp.zeros((), jnp.int32),
            'params': params,
            'batch_stats': batch_stats,
            'teacher_params': teacher_params,
            'teacher_batch_stats': teacher_batch_stats,
            'opt_state': self.tx.init(params),
            'queue': queue,
            'queue_ptr': jnp.zeros((), jnp.int32),
            'center': jnp.zeros((m.local_prototypes,), jnp.float32),
        }

    def objective(self, state: dict, batch: dict) -> tuple[Callable, dict]:
        """The CMID loss of `batch` as a function of the student parameters, and the views.

        The function maps params to (loss, aux) (`objective.cmid_loss`); everything else (teacher,
        queue, centre, batch statistics, this step's augmentations) comes from `state`.
        """
        c = self.config
        step = state['step']
        views = objective.prepare_views(batch, step, c)
        teacher_temp = losses.teacher_temperature(
            self.schedule.epoch(step),
            c.loss.teacher_temp_warmup,
            c.loss.teacher_temp,
            c.loss.teacher_temp_warmup_epochs,
        )
        teacher = {'params': state['teacher_params'], 'batch_stats': state['teacher_batch_stats']}

        def loss_fn(params):
            student = {'params': params, 'batch_stats': state['batch_stats']}
            return objective.cmid_loss(
                student,
                teacher,
                state['queue'],
                state['center'],
                views,
                nets=self.nets,
                loss=c.loss,
                teacher_temp=teacher_temp,
            )

        return loss_fn, views

    def __call__(self, state: dict, batch: dict) -> tuple[dict, dict]:
        """One optimizer step followed by the EMA teacher update; returns (state, metrics)."""
        c = self.config
        step = state['step']
        loss_fn, views = self.objective(state, batch)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # EMA momentum of this step (a metric too); the teacher moves after the optimizer step.
        momentum = optim.ema_momentum(step, self.schedule.total_steps, c.optim.ema_momentum)

        def apply(state):
            updates, opt_state = self.tx.update(grads, state['opt_state'], state['params'])
            params = optax.apply_updates(state['params'], updates)
            # EMA after the optimizer step (D6: no one-step lag), on the teacher's parts only.
            teacher_params = optax.incremental_update(
                {k: params[k] for k in cmid.TEACHER_KEYS}, state['teacher_params'], 1.0 - momentum
            )
            queue, queue_ptr = state['queue'], state['queue_ptr']
            if c.loss.use_global:
                queue, queue_ptr = objective.enqueue(queue, queue_ptr, aux['new_keys'])
            return dict(
                state,
                params=params,
                batch_stats=aux['student_batch_stats'],
                teacher_params=teacher_params,
                teacher_batch_stats=aux['teacher_batch_stats'],
                opt_state=opt_state,
                queue=queue,
                queue_ptr=queue_ptr,
                center=aux['center'],
            )

        # A non-finite step leaves the state as it was (the loop then stops, or skips and counts
        # it), so a NaN never reaches the weights, the optimizer moments, the teacher, the batch
        # statistics, the queue or a checkpoint. A branch rather than a select over every state
        # array: a finite step reads and writes the state once (ViT-B/16 at batch 8: 4.2 GB
        # fewer of XLA's bytes accessed, experiments/benchmarks/README.md).
        new_state = jax.lax.cond(finite, apply, dict, state)
        new_state['step'] = step + 1
        new_state['nonfinite_steps'] = state['nonfinite_steps'] + (~finite).astype(jnp.int32)
        metrics = {
            'loss': loss,
            **{f'loss_{k}': v for k, v in aux['terms'].items()},
            'lr': self.lr_fn(step),
            'ema_momentum': momentum,
            'teacher_temp': aux['teacher_temp'],
            'embedding_std': aux['embedding_std'],
            'grad_norm': grad_norm,
            'nonfinite_steps': new_state['nonfinite_steps'],
        }
        if c.loss.use_mim:
            metrics['recon_psnr'] = objective.masked_psnr(
                aux['reconstruction'], views['a']['target'], views['a']['pixel_mask'], c.data.std
            )
        return new_state, metrics

    def jit(self, state_sharding, batch_sharding, replicated):
        """The step jitted over the mesh, with the state donated."""
        return jax.jit(
            self.__call__,
            in_shardings=(state_sharding, batch_sharding),
            out_shardings=(state_sharding, replicated),
            donate_argnums=(0,),
        )

    @functools.cached_property
    def abstract_state(self):
        return jax.eval_shape(self.init_state, jax.random.key(0))
