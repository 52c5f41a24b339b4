"""CMID pretraining loop: mesh -> workdir -> data -> model -> state/restore -> step -> loop."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator

import grain
import jax
import ml_collections
from absl import flags

from cmid_jax import metrics as metrics_lib
from cmid_jax import parallel
from cmid_jax.config_resolve import override, resolve, resume_changes
from cmid_jax.data import describe_source, open_source
from cmid_jax.data.bad_files import BadFiles
from cmid_jax.data.pipeline import Source, build_dataset, make_iterator
from cmid_jax.errors import Diverged, Preempted, WorkdirError, hint, one_line
from cmid_jax.evaluation.periodic import PeriodicEvals
from cmid_jax.perf.aot import resolve_remat
from cmid_jax.step import TrainStep
from cmid_jax.workdir import (
    BAD_FILES,
    CKPT,
    CONFIG,
    HISTORY,
    METRICS,
    Workdir,
)
from cmid_jax.workdir_lock import WorkdirLock

__all__ = ['input_pipeline', 'train_and_evaluate']

_DATA_HINT = 'check data.path, data.bands and data.tile_size'


def input_pipeline(
    config: ml_collections.ConfigDict, source: Source, bad_files: BadFiles | None = None
) -> grain.DatasetIterator:
    """This process's checkpointable iterator of batch slices (`cmid_jax.data.pipeline`).

    One batch is decoded first, so unreadable data fail before anything is compiled (and, with
    `bad_files`, a first sample of bad files is reported).
    """
    dataset = build_dataset(
        source,
        image_size=config.data.image_size,
        global_batch_size=config.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    first = dataset[0]
    if bad_files is not None:
        bad_files.update(first['bad_images'], step=0)
    if config.data.num_workers and not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags; a library caller has none.
    return make_iterator(dataset, num_workers=config.data.num_workers)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> dict:
    """Pretrains (or resumes) in `workdir`; returns the last logged metrics.

    Expected problems raise a `cmid_jax.errors.UserError` (one line, nothing overwritten); a
    SIGTERM saves the state and raises `Preempted`. A resumed run must use the config in the
    workdir's config.json, apart from the fields `config_resolve.MAY_CHANGE_ON_RESUME` lists,
    unless `allow_config_change`. A finished run is not run again: its summary is logged.
    """
    session_start = time.monotonic()
    # --- Mesh --------------------------------------------------------------------------------
    mesh = parallel.make_mesh()
    replicated, batch_sharding = parallel.shardings(mesh)
    num_processes, process = jax.process_count(), jax.process_index()

    # --- Workdir: lock, then resume checks before anything is written ------------------------
    wd = Workdir(workdir)
    with _exclusive(wd), contextlib.ExitStack() as cleanup:
        # Image files, GeoTIFF tiles, ArrayRecord shards or TFDS (cmid_jax/data/sources.py); the
        # resolved bands, pixel type, mean/std, value range and run length go to config.json.
        with hint(_DATA_HINT):
            source = open_source(resolve(config).data)
        config = resolve(
            config, source, num_devices=jax.device_count(), num_processes=num_processes
        )
        total_steps, steps_per_epoch = config.total_steps, config.steps_per_epoch
        ckpt = wd.checkpoints(
            every_steps=config.checkpoint_every_steps, keep=config.keep_checkpoints
        )
        cleanup.callback(ckpt.close)  # Waits for the last save; a failed one raises SaveError.
        latest = ckpt.latest_step()
        changes = {}
        if latest is not None and wd.has_config():
            changes = resume_changes(wd.read_config(), config, allow=allow_config_change)
        if latest is not None and latest >= total_steps:
            logging.info(
                '%s is complete (step %d of %d); nothing to do.\n%s',
                wd,
                latest,
                total_steps,
                closing_summary(wd, config, latest),
            )
            return _last_metrics(wd)
        if process == 0:
            wd.write_config(config)
            wd.append_history(
                'resume' if latest is not None else 'start',
                step=latest or 0,
                changes={k: list(v) for k, v in changes.items()},
            )
        if changes:
            logging.warning(
                'Resuming with changed settings (%s): the saved weights, optimizer '
                'state, queue, step and data position continue under the new values.',
                ', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in changes.items()),
            )
        logging.info('Config: %s', wd / CONFIG)

        # --- Input pipeline ------------------------------------------------------------------
        bad_name = BAD_FILES if process == 0 else f'bad_files.process{process}.jsonl'
        bad_log = wd.jsonl(bad_name)
        cleanup.callback(bad_log.close)
        bad_files = BadFiles(source, wd.read_jsonl(bad_name), bad_log.write)
        with hint(_DATA_HINT):
            data_iter = input_pipeline(config, source, bad_files)
        if hasattr(data_iter, 'close'):
            cleanup.callback(data_iter.close)  # Stops grain's worker processes.
        logging.info(
            '%s; %d steps of %d (%d per epoch).',
            describe_source(config.data, source),
            total_steps,
            config.batch_size,
            steps_per_epoch,
        )
        logging.info('%s', healthy_start(config))

        # --- Model, optimizer and state ------------------------------------------------------
        # model.remat='auto': the lightest policy whose compiled step fits these devices (logged).
        remat = resolve_remat(config, list(mesh.devices.flat))
        step_fn = TrainStep.create(override(config, {'model.remat': remat}))
        abstract_state = parallel.with_sharding(step_fn.abstract_state, replicated)
        state, restored = ckpt.restore_newest(abstract_state, data_iter, move_damaged=True)
        if state is not None:
            logging.info('Resumed from the checkpoint of step %d in %s.', restored, wd)
        else:
            state = jax.jit(step_fn.init_state, out_shardings=replicated)(
                jax.random.key(config.seed)
            )
            if total_steps == 0:  # Saves the initial weights: the random-init evaluation baseline.
                ckpt.save(0, state, data_iter, force=True)
        train_step = step_fn.jit(replicated, batch_sharding, replicated)

        # --- Evals ---------------------------------------------------------------------------
        writer = cleanup.enter_context(
            contextlib.closing(metrics_lib.MetricWriter(wd, is_main_process=process == 0))
        )
        with hint('check eval.path and eval.dense_path'):
            evals = PeriodicEvals(config, mesh, wd, writer, total_steps)
        first_step = int(jax.device_get(state['step']))
        evals.first_points(first_step, state)  # The curves' first points, on a resume too.

        # --- Loop ----------------------------------------------------------------------------
        progress = metrics_lib.Progress(total_steps)
        logged = {}
        previous = None  # (step, metrics) checked one step late, never stalling the device.
        preemption = PreemptionSignal(enabled=num_processes == 1)
        cleanup.callback(preemption.restore)
        step, status = first_step, 'failed'
        if process == 0:
            cleanup.callback(
                lambda: wd.append_history(
                    'end',
                    status=status,
                    step=step,
                    seconds=round(time.monotonic() - session_start, 1),
                )
            )
        try:
            for step in range(first_step + 1, total_steps + 1):
                with hint(_DATA_HINT):
                    batch = next(data_iter)
                    bad_files.update(batch.pop('bad_images'), step)
                batch = parallel.global_batch(batch, batch_sharding)
                state, step_metrics = train_step(state, batch)
                if previous is not None:
                    _check_finite(*previous, config.max_nonfinite_steps)
                previous = step, step_metrics
                preempted = preemption.received or (
                    num_processes > 1 and ckpt.reached_preemption(step)
                )
                save_due = ckpt.should_save(step) or step == total_steps or preempted
                if step % config.log_every_steps == 0 or save_due or step == first_step + 1:
                    # Reading every metric back is a full sync; per step only the NaN flag is read.
                    _check_finite(step, step_metrics, config.max_nonfinite_steps)
                    logged = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                    logged['bad_images'] = bad_files.count
                    writer.write_scalars(step, logged)
                    line, logged['steps_per_second'] = progress.line(step, logged)
                    logging.info('%s', line)
                    ckpt.check()  # A failed background save stops the run here.
                if not preempted:  # A preempted run must save before its grace period ends.
                    logged.update(evals(step, state, batch))
                if save_due:
                    writer.flush()  # Remote metrics.jsonl: every line up to this checkpoint.
                    bad_log.flush()
                    ckpt.save(step, state, data_iter, force=step == total_steps or preempted)
                if preempted:
                    ckpt.wait()
                    raise Preempted(step, str(wd))
            ckpt.wait()
            status = 'finished'
        except Exception as e:  # pylint: disable=broad-except  # Recorded in history.jsonl.
            status = 'preempted' if isinstance(e, Preempted) else f'failed: {one_line(e)}'
            raise
    logging.info('%s', closing_summary(wd, config, step))
    return logged


@contextlib.contextmanager
def _exclusive(wd: Workdir) -> Iterator[None]:
    """Holds the workdir lock (process 0) for the run; every process stops if it is taken."""
    lock, failure = WorkdirLock(wd), None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except WorkdirError as e:
            failure = e
    refusal = parallel.share_from_process_0('workdir_lock', failure.message if failure else '')
    if failure is None and refusal:
        failure = WorkdirError(
            f'Process 0 could not lock the workdir: {refusal}', 'see the log of process 0'
        )
    if failure is not None:
        raise failure
    try:
        yield
    finally:
        if jax.process_index() == 0:
            lock.release()


def closing_summary(wd: Workdir, config: ml_collections.ConfigDict, step: int) -> str:
    """Steps, wall time, final losses, last kNN and dense probe, the checkpoint and the commands
    to run next."""
    records = wd.read_jsonl(METRICS)
    last = next((r for r in reversed(records) if 'loss' in r), {})
    knn = next((r for r in reversed(records) if 'knn_top1_student' in r), None)
    dense = next((r for r in reversed(records) if any(k.startswith('dense_') for k in r)), None)
    sessions = [r for r in wd.read_jsonl(HISTORY) if r.get('event') == 'end']
    seconds = sum(r.get('seconds', 0) for r in sessions)
    losses = ' '.join(
        f'{k}={last[k]:.4f}' for k in ('loss', 'loss_mim', 'loss_global', 'loss_local') if k in last
    )
    lines = [
        f'Run complete: step {step} of {config.total_steps}, '
        f'{metrics_lib.duration(seconds)} of wall time in {len(sessions)} session(s); '
        f'at step {last.get("step", "?")}: {losses or "no metrics logged"}.'
    ]
    if knn is not None:
        lines.append(
            f'kNN top-1 at step {knn["step"]}: student {knn["knn_top1_student"]:.4f}, '
            f'teacher {knn["knn_top1_teacher"]:.4f}.'
        )
    if dense is not None:
        name, value = next((k, v) for k, v in dense.items() if k.startswith('dense_'))
        lines.append(f'Dense probe at step {dense["step"]}: {name} {value:.4f}.')
    eval_data = config.eval.path or 'LABELLED_DIR (one sub-folder per class)'
    lines += [
        f'Checkpoint: {wd / CKPT / str(step)}',
        'Next:',
        f'  cmid-export --workdir={wd} --out={wd / "export" / "backbone.safetensors"}',
        f'  cmid-evaluate --workdir={wd} --data={eval_data}',
    ]
    return '\n'.join(lines)


def _last_metrics(wd: Workdir) -> dict:
    records = wd.read_jsonl(METRICS)
    return {k: v for k, v in records[-1].items() if k != 'step'} if records else {}


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
    raise Diverged(
        f'Non-finite loss or gradient at step {step} (loss={terms["loss"]}, '
        f'mim={terms["loss_mim"]}, global={terms["loss_global"]}, local={terms["loss_local"]}, '
        f'grad_norm={terms["grad_norm"]}); {int(terms["nonfinite_steps"])} such steps so far, '
        f'max_nonfinite_steps={allowed}. The update was not applied and not saved; the last '
        f'checkpoint is untouched. All metrics: {json.dumps(terms)}',
        'to resume from the last checkpoint, run the command again with a lower '
        '--config.optim.base_lr (or --config.model.compute_dtype=float32) and '
        '--allow_config_change',
    )


def healthy_start(config: ml_collections.ConfigDict) -> str:
    """One log line on how the loss terms of this config behave in their first steps.

    The total loss of a healthy run rises at first: InfoNCE against a queue of random keys is low
    and climbs towards ln(1 + queue) as real (still alike) keys replace them, and the teacher's
    centred, warming-up outputs put the local cross-entropy near ln(prototypes).
    """
    c, parts = config.loss, []
    if c.use_global:
        fill = math.ceil(c.queue_size / (2 * config.batch_size))
        parts.append(
            f'loss_global climbs towards ln(1 + queue_size) = '
            f'{math.log1p(c.queue_size):.2f} while the queue fills with real keys '
            f'({fill} steps), then falls as crops become distinguishable'
        )
    if c.use_local:
        warmup = c.teacher_temp_warmup_epochs * config.steps_per_epoch
        parts.append(
            f'loss_local stays near ln(local_prototypes) = '
            f'{math.log(config.model.local_prototypes):.2f} while the teacher '
            f'temperature warms up ({warmup} steps)'
        )
    if c.use_mim:
        parts.append('loss_mim falls and recon_psnr rises from the first steps')
    return (
        'Healthy training: ' + '; '.join(parts) + '; embedding_std near 0 would mean '
        'collapse. See "What healthy training looks like" in the README.'
    )
