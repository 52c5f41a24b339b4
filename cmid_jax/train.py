"""CMID pretraining loop: mesh -> data -> model -> state/restore -> step -> loop."""

from __future__ import annotations

import json
import logging
import signal
import threading

import grain
import jax
import ml_collections
import numpy as np
from absl import flags

from cmid_jax import checkpointing, metrics as metrics_lib, optim, parallel
from cmid_jax.data import describe_source, open_source, resolve_data_config
from cmid_jax.data.pipeline import Source, build_dataset, make_iterator
from cmid_jax.evaluation.periodic import PeriodicEvals
from cmid_jax.step import Trainer


def check_config(config: ml_collections.ConfigDict, num_devices: int, num_processes: int) -> None:
    """Fails fast, before anything is compiled, on settings that cannot work together."""
    problems = []
    bs, size, patch = config.batch_size, config.data.image_size, config.mask.patch_size
    if bs <= 0 or bs % num_devices:
        problems.append(f'batch_size={bs} must be a positive multiple of the {num_devices} devices')
    if bs % num_processes:
        problems.append(f'batch_size={bs} must divide over the {num_processes} processes')
    if size % patch:
        problems.append(f'data.image_size={size} must be a multiple of mask.patch_size={patch}')
    grid = size // patch
    if config.loss.use_local and not 0 < config.loss.num_matches <= grid * grid:
        problems.append(f'loss.num_matches={config.loss.num_matches} must be in [1, {grid * grid}] '
                        f'for a {grid}x{grid} grid at image_size={size}')
    if config.loss.use_global and config.loss.queue_size < 2 * bs:
        problems.append(f'loss.queue_size={config.loss.queue_size} must hold at least the '
                        f'{2 * bs} keys a step enqueues (2 x batch_size)')
    if not (config.loss.use_mim or config.loss.use_global or config.loss.use_local):
        problems.append('all of loss.use_mim, loss.use_global and loss.use_local are off')
    if problems:
        raise ValueError('Invalid config: ' + '; '.join(problems) + '.')


def input_pipeline(config: ml_collections.ConfigDict, source: Source) -> grain.DatasetIterator:
    """This process's checkpointable iterator of batch slices (`cmid_jax.data.pipeline`).

    One batch is decoded first, so unreadable data fail before anything is compiled.
    """
    dataset = build_dataset(source, image_size=config.data.image_size,
                            global_batch_size=config.batch_size, seed=config.seed,
                            process_index=jax.process_index(), process_count=jax.process_count())
    dataset[0]
    if config.data.num_workers and not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags; a library caller has none.
    return make_iterator(dataset, num_workers=config.data.num_workers)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Pretrains (or resumes) in `workdir`; returns the last logged metrics."""
    # --- Mesh --------------------------------------------------------------------------------
    mesh = parallel.make_mesh()
    replicated, batch_sharding = parallel.shardings(mesh)
    num_processes, process = jax.process_count(), jax.process_index()
    check_config(config, jax.device_count(), num_processes)

    # --- Input pipeline ----------------------------------------------------------------------
    config = config.copy_and_resolve_references()  # The resolved copy is what config.json records.
    # Image files, GeoTIFF tiles, ArrayRecord shards or TFDS (cmid_jax/data/sources.py); the
    # resolved bands, pixel type, mean/std and value range travel in config.json.
    source = open_source(config.data)
    resolve_data_config(config.data, source)
    steps_per_epoch = config.steps_per_epoch = (
        config.steps_per_epoch or max(len(source) // config.batch_size, 1))
    if config.total_steps is None:
        config.total_steps = config.epochs * steps_per_epoch
    total_steps = config.total_steps
    if process == 0:
        checkpointing.write_config(workdir, config)
    data_iter = input_pipeline(config, source)
    logging.info('%s; %d steps of %d (%d per epoch).', describe_source(config.data, source),
                 total_steps, config.batch_size, steps_per_epoch)

    # --- Model, optimizer and state ----------------------------------------------------------
    trainer = Trainer.create(config, optim.Schedule(total_steps, steps_per_epoch))
    abstract_state = checkpointing.abstract_with_sharding(trainer.abstract_state, replicated)
    ckpt = checkpointing.Checkpointer(workdir, every_steps=config.checkpoint_every_steps,
                                      keep=config.keep_checkpoints)
    latest = ckpt.latest_step()
    if latest is not None:
        state = ckpt.restore(latest, abstract_state, data_iter)
        logging.info('Resumed from the checkpoint of step %d in %s.', latest, workdir)
    else:
        state = jax.jit(trainer.init_state, out_shardings=replicated)(jax.random.key(config.seed))
        if total_steps == 0:  # Saves the initial weights: the random-init evaluation baseline.
            ckpt.save(0, state, data_iter, force=True)
    train_step = trainer.jit_train_step(replicated, batch_sharding, replicated)

    # --- Evals -------------------------------------------------------------------------------
    writer = metrics_lib.MetricWriter(workdir, is_main_process=process == 0)
    evals = PeriodicEvals(config, mesh, workdir, writer, total_steps)
    first_step = int(jax.device_get(state['step']))
    if evals.knn is not None and first_step == 0:
        evals.run_knn(0, state)  # The untrained baseline: the first point of the kNN curve.

    # --- Loop --------------------------------------------------------------------------------
    progress = metrics_lib.Progress(total_steps, first_step)
    bad_images = 0
    logged = {}
    previous = None  # (step, metrics) checked one step late, so the check never stalls the device.
    preemption = PreemptionSignal(enabled=num_processes == 1)
    try:
        for step in range(first_step + 1, total_steps + 1):
            batch = next(data_iter)
            bad_images += int(np.sum(batch.pop('bad_images')))
            batch = parallel.global_batch(batch, batch_sharding)
            state, step_metrics = train_step(state, batch)
            if previous is not None:
                _check_finite(*previous, config.max_nonfinite_steps)
            previous = step, step_metrics
            preempted = preemption.received or (
                num_processes > 1 and ckpt.manager.reached_preemption(step))
            save_due = ckpt.manager.should_save(step) or step == total_steps or preempted
            if step % config.log_every_steps == 0 or save_due or step == first_step + 1:
                # Reading every metric back is a full sync; per step only the NaN flag is read.
                _check_finite(step, step_metrics, config.max_nonfinite_steps)
                logged = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                logged['bad_images'] = bad_images
                writer.write_scalars(step, logged)
                line, rate = progress.line(step, logged)
                logged['steps_per_second'] = rate
                logging.info('%s%s', line, f' ({bad_images} bad images skipped)' if bad_images else '')
            if not preempted:  # A preempted run must save before its grace period ends.
                logged.update(evals(step, state, batch))
            if save_due:
                ckpt.save(step, state, data_iter, force=step == total_steps or preempted)
            if preempted:
                logging.warning('Preempted (SIGTERM): saved the checkpoint of step %d; run the same '
                                'command to resume.', step)
                break
    finally:
        preemption.restore()
        ckpt.wait()
        ckpt.close()
        writer.close()
        if hasattr(data_iter, 'close'):
            data_iter.close()
    return logged


class PreemptionSignal:
    """Records SIGTERM (the preemption notice of TPU VMs and most schedulers) for the loop.

    On several processes JAX's own preemption service handles the signal and orbax's
    `reached_preemption` makes every host stop at the same step, so the handler is only
    installed for single-process runs.
    """

    def __init__(self, enabled: bool):
        self.received = False
        self._previous = None
        if enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self.received = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _check_finite(step: int, step_metrics: dict, allowed: int) -> None:
    """Stops the run once more than `allowed` steps had a non-finite loss or gradient."""
    if int(step_metrics['nonfinite_steps']) <= allowed:
        return
    terms = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    raise FloatingPointError(
        f'Non-finite loss or gradient at step {step} (loss={terms["loss"]}, '
        f'mim={terms["loss_mim"]}, global={terms["loss_global"]}, local={terms["loss_local"]}, '
        f'grad_norm={terms["grad_norm"]}); {int(terms["nonfinite_steps"])} such steps so far, '
        f'max_nonfinite_steps={allowed}. The update was not applied and not saved; the last '
        f'checkpoint is untouched. All metrics: {json.dumps(terms)}')
