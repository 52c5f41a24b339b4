"""The evaluation protocol registry: every protocol and option reachable from `cmid-evaluate`,
options that belong to one protocol rejected by the others, the train loop's online evaluations
chosen from the config through the registry."""

import dataclasses
import json
import types

import numpy as np
import pytest
from absl import flags

from cmid_jax import errors, metrics
from cmid_jax.evaluation import dense, periodic, protocols, run
from cmid_jax.evaluation.protocols import base
from cmid_jax.evaluation.protocols.dense_probe import DenseOptions
from cmid_jax.evaluation.protocols.finetune import FinetuneOptions
from cmid_jax.tools import evaluate as cli
from cmid_jax.workdir import Workdir
from configs import vitb


def parse(*argv: str) -> flags.FlagValues:
    """`cmid-evaluate`'s flags, defined from the registry as it is now, parsed from `argv`."""
    flag_values = flags.FlagValues()
    cli.define_flags(flag_values)
    flag_values(['cmid-evaluate', '--workdir=w', '--data=d', *argv])
    return flag_values


# --- the command line ---------------------------------------------------------------------------


def test_every_protocol_is_a_flag_value_with_its_options_defaults():
    assert parse()['protocol'].parser.enum_values == list(protocols.PROTOCOLS)
    assert list(protocols.PROTOCOLS) == ['knn', 'linear', 'finetune', 'segmentation', 'change']
    for name, owner in protocols.PROTOCOLS.items():
        options = cli.chosen_options(parse(f'--protocol={name}'))
        assert protocols.make_options(name, **options) == owner.OPTIONS(), name


def test_the_flags_keep_their_names_defaults_and_meaning():
    f = parse()
    assert f['head'].parser.enum_values == ['linear', 'fpn']
    defaults = {name: f[name].default for name in ('epochs', 'batch_size', 'lr', 'head', 'scale')}
    assert defaults == {'epochs': 10, 'batch_size': 64, 'lr': 1e-4, 'head': 'linear', 'scale': 1.0}
    assert f['split_group'].default is None and f['which'].default == 'student'
    assert f['lr'].help.startswith('finetune only: ')
    assert f['scale'].help.startswith('segmentation / change only: ')

    f = parse('--protocol=change', '--head=fpn', '--scale=0.5', '--split_group=^(tile\\d+)_')
    options = protocols.make_options('change', **cli.chosen_options(f))
    assert options == DenseOptions(head='fpn', split_group='^(tile\\d+)_', scale=0.5)
    f = parse('--protocol=finetune', '--epochs=3', '--batch_size=8', '--lr=0.5')
    options = protocols.make_options('finetune', **cli.chosen_options(f))
    assert options == FinetuneOptions(epochs=3, batch_size=8, lr=0.5)


def test_a_flag_of_another_protocol_is_one_line():
    with pytest.raises(errors.UserError) as e:
        cli.chosen_options(parse('--protocol=knn', '--head=fpn'))
    assert (
        e.value.message
        == "'head' is an option of segmentation / change, not of knn (knn takes no options)"
    )
    with pytest.raises(
        errors.UserError, match=r"^'epochs' is an option of finetune, not of change"
    ):
        cli.chosen_options(parse('--protocol=change', '--epochs=3'))
    with pytest.raises(errors.UserError, match=r'^scale must be positive, got 0\.0$'):
        cli.chosen_options(parse('--protocol=segmentation', '--scale=0'))


# --- options ------------------------------------------------------------------------------------


def test_options_of_another_protocol_are_rejected_with_one_line(tmp_path):
    cases = {
        ('knn', 'head'): "'head' is an option of segmentation / change, not of knn "
        '(knn takes no options)',
        ('segmentation', 'epochs'): "'epochs' is an option of finetune, not of segmentation "
        '(segmentation takes head, split_group, scale)',
        ('finetune', 'scale'): "'scale' is an option of segmentation / change, not of finetune "
        '(finetune takes epochs, batch_size, lr)',
        ('change', 'heads'): "'heads' is no evaluation protocol's option "
        '(change takes head, split_group, scale)',
    }
    for (protocol, name), line in cases.items():
        with pytest.raises(ValueError) as e:
            protocols.make_options(protocol, **{name: 1})
        assert str(e.value) == line
    # `evaluate` checks them before it reads any data or checkpoint.
    with pytest.raises(ValueError, match=r"^'head' is an option of segmentation / change, not"):
        run.evaluate(str(tmp_path / 'no-workdir'), str(tmp_path / 'no-data'), 'linear', head='fpn')
    with pytest.raises(ValueError, match=r"^protocol must be one of \('knn', "):
        run.evaluate(str(tmp_path), str(tmp_path), 'kmeans')
    with pytest.raises(ValueError, match=r"^head must be one of \('linear', 'fpn'\), got 'mlp'"):
        protocols.make_options('segmentation', head='mlp')


def test_one_option_name_one_meaning(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Clash:
        scale: float = base.option(2.0, 'another scale.')

    monkeypatch.setitem(protocols.PROTOCOLS, 'clash', types.SimpleNamespace(OPTIONS=Clash))
    with pytest.raises(TypeError, match=r"option 'scale' of protocol 'clash' differs"):
        protocols.option_specs()


# --- a new protocol -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ToyOptions:
    level: int = base.option(3, 'how hard.')


def toy_protocol(plotted: list) -> types.SimpleNamespace:
    """A protocol as a new module would define it, with an online form that is always on."""
    return types.SimpleNamespace(
        OPTIONS=ToyOptions,
        ONLINE=base.OnlineEval(
            curve='toy',
            metric_prefix='toy_',
            enabled=lambda config: True,
            build=lambda config, mesh: lambda state, preview: {'toy_score': float(state)},
            plot=lambda metrics_jsonl, png, names: plotted.append((png.name, names)),
        ),
        split=lambda data, train_fraction, seed, options: (data, train_fraction, seed),
        run=lambda split, options, context: {'level': options.level, 'split': list(split)},
    )


def test_a_new_protocol_is_one_registry_entry(monkeypatch, tmp_path):
    """Registered, it is a value of --protocol with its options as flags, `evaluate` runs it and
    appends its line to eval.jsonl, and the train loop runs its online form."""
    plotted = []
    monkeypatch.setitem(protocols.PROTOCOLS, 'toy', toy_protocol(plotted))
    f = parse('--protocol=toy', '--level=5')
    assert 'toy' in f['protocol'].parser.enum_values and f['level'].help == 'toy only: how hard.'
    assert cli.chosen_options(f) == {'level': 5}

    config = vitb.get_config('smoke')
    monkeypatch.setattr(run, 'restore_train_state', lambda workdir, step: (config, {}, 7))
    monkeypatch.setattr(run, 'backbone_variables', lambda state, which: {})
    result = run.evaluate(str(tmp_path), 'somewhere', 'toy', seed=4, level=5)
    assert (result['protocol'], result['step'], result['level']) == ('toy', 7, 5)
    assert result['split'] == ['somewhere', 0.5, 4]
    lines = (tmp_path / 'eval.jsonl').read_text().splitlines()
    assert [json.loads(x) for x in lines] == [result]

    config.eval.every_steps, config.images_every_steps = 5, 0
    workdir = Workdir(str(tmp_path))
    writer = metrics.MetricWriter(workdir)
    evals = periodic.PeriodicEvals(config, None, workdir, writer, 100)
    assert list(evals.specs) == ['toy']  # eval.path and eval.dense_path are not set.
    assert evals.first_points(0, 1.0) == {'toy_score': 1.0}
    assert evals(3, 2.0, None) == {} and evals(5, 3.0, None) == {'toy_score': 3.0}
    assert plotted == [('toy.png', ('toy_score',))] * 2
    assert evals.first_points(5, 4.0) == {}  # metrics.jsonl has the point of step 5.
    writer.close()


def test_periodic_evals_follow_the_config_through_the_registry(tmp_path):
    config = vitb.get_config('smoke')
    assert protocols.online_evals(config) == {}
    config.eval.path = str(tmp_path)
    assert list(protocols.online_evals(config)) == ['knn']
    (tmp_path / 'images').mkdir()
    config.eval.dense_path = str(tmp_path)
    assert list(protocols.online_evals(config)) == ['knn', 'segmentation']
    (tmp_path / 'A').mkdir()
    assert list(protocols.online_evals(config)) == ['knn', 'change']
    config.eval.path = None
    (online,) = protocols.online_evals(config).values()
    assert (online.curve, online.metric_prefix, online.preview) == ('dense', 'dense_', True)


# --- dense tasks and settings -------------------------------------------------------------------


def test_dense_tasks_carry_what_differs():
    seg, change = dense.SEGMENTATION, dense.CHANGE
    assert (seg.name, seg.dates, seg.score, seg.class_weights) == (
        'segmentation',
        1,
        'miou',
        'none',
    )
    assert (change.name, change.dates, change.score) == ('change', 2, 'f1')
    assert change.class_weights == 'balanced' and seg != change and len({seg, change}) == 2
    pairs = np.arange(2 * 3 * 4, dtype=np.float32).reshape(1, 2, 3, 4)
    a, b = pairs[..., :2], pairs[..., 2:]
    np.testing.assert_array_equal(
        change.head_input(lambda x: x, pairs), np.concatenate([np.abs(a - b), a * b], -1)
    )
    np.testing.assert_array_equal(seg.head_input(lambda x: 2 * x, pairs), 2 * pairs)
    assert list(change.preview_images(pairs[0])) == ['A', 'B']
    targets = np.array([[0, 0, 0, 1]], np.uint8)
    assert seg.loss_weights(targets, 2) is None
    np.testing.assert_allclose(change.loss_weights(targets, 2), [4 / 6, 4 / 2])


def test_probe_settings_are_named_and_checked():
    with pytest.raises(TypeError):
        dense.ProbeSettings('linear', 0, 64, 1.0)  # Positional: seed and batch size could swap.
    with pytest.raises(ValueError, match='batch_size must be positive, got 0'):
        dense.ProbeSettings(batch_size=0)
