"""Collects the evaluations of ablation workdirs into one JSON Lines file and a markdown table.

    python experiments/ablation/collect.py runs/ablation_aid10k* --out experiments/ablation/results.jsonl

Each workdir's `eval.jsonl` (written by `python -m cmid_jax.tools.evaluate`) gets the setting and the
pretraining seed read from its `config.json`; the table gives, per backbone, setting and protocol,
the mean over seeds first and each seed's value after it: top-1 (%) for kNN and the linear probe,
mIoU (%) for segmentation and the change class's F1 (%) for change detection, one column per
dense data set. With `--paired`, a second table gives full CMID minus each setting, paired by
pretraining seed.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

# Runs as a plain script: the settings come from the ablation config itself.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from configs.ablation import SETTINGS  # noqa: E402

PROTOCOLS = ('knn', 'linear')
DENSE_METRIC = {'segmentation': ('miou', 'mIoU'), 'change': ('f1', 'F1')}


def column(row: dict) -> str:
    """The table column of an evaluation: its protocol, or for a dense one its data set, metric
    and (unless linear) head."""
    if row['protocol'] not in DENSE_METRIC:
        return row['protocol']
    head = '' if row['head'] == 'linear' else f' ({row["head"]})'
    return f'{Path(row["data"]).name} {DENSE_METRIC[row["protocol"]][1]}{head}'


def score(row: dict) -> float:
    return 100 * row[DENSE_METRIC.get(row['protocol'], ('top1',))[0]]


def setting_of(config: dict, step: int) -> str:
    """The setting of `configs/ablation.py` whose loss switches a run used; `random` is the
    0-step run (it keeps the full setting's switches)."""
    if step == 0:
        return 'random'
    switches = {key: config['loss'][key] for key in SETTINGS['full']}
    return next(name for name, s in SETTINGS.items() if name != 'random' and s == switches)


def collect(roots: list[Path]) -> list[dict]:
    rows = []
    for root in roots:
        for evals in sorted(root.glob('*/eval.jsonl')):
            config = json.loads((evals.parent / 'config.json').read_text())
            for line in evals.read_text().splitlines():
                r = json.loads(line)
                rows.append(
                    dict(
                        r,
                        # Folder names only: the table is shared, the machine's paths are not.
                        data=Path(r['data']).name,
                        setting=setting_of(config, r['step']),
                        pretrain_seed=config['seed'],
                        workdir=f'{root.name}/{evals.parent.name}',
                    )
                )
    return rows


def by_seed(rows: list[dict]) -> tuple[dict, list[str]]:
    """({(arch, variant, setting, column): {pretrain seed: score}}, the columns in table order)."""
    scores = collections.defaultdict(dict)
    for r in rows:
        scores[(r['arch'], r['variant'], r['setting'], column(r))][r['pretrain_seed']] = score(r)
    columns = [p for p in PROTOCOLS if any(k[3] == p for k in scores)]
    columns += sorted(
        {k[3] for k in scores} - set(PROTOCOLS), key=lambda c: ('mIoU' not in c, c)
    )  # Segmentation first.
    return scores, columns


def _rows(scores: dict, columns: list[str], cell) -> list[str]:
    lines = [
        '| backbone | setting | ' + ' | '.join(columns) + ' |',
        '|---|---|' + '---|' * len(columns),
    ]
    for arch, variant in sorted({(k[0], k[1]) for k in scores}):
        for setting in SETTINGS:
            cells = [cell(arch, variant, setting, c) for c in columns]
            if any(cells):
                lines.append(f'| {arch} {variant} | {setting} | ' + ' | '.join(cells) + ' |')
    return lines


def table(rows: list[dict]) -> str:
    scores, columns = by_seed(rows)

    def cell(arch, variant, setting, col):
        values = [v for _, v in sorted(scores.get((arch, variant, setting, col), {}).items())]
        if not values:
            return ''
        each = ' / '.join(f'{v:.1f}' for v in values)
        return f'{sum(values) / len(values):.1f}' + (f' ({each})' if len(values) > 1 else '')

    return '\n'.join(_rows(scores, columns, cell))


def paired_table(rows: list[dict], reference: str = 'full') -> str:
    """Per setting, the mean over shared pretraining seeds of (reference - setting) in points,
    and how many of those seeds have the reference ahead (the same seed gives both runs the same
    initialisation, data order and augmentations)."""
    scores, columns = by_seed(rows)

    def cell(arch, variant, setting, col):
        ref = scores.get((arch, variant, reference, col), {})
        other = scores.get((arch, variant, setting, col), {})
        seeds = sorted(ref.keys() & other.keys())
        if setting == reference or not seeds:
            return ''
        diffs = [ref[s] - other[s] for s in seeds]
        ahead = sum(d > 0 for d in diffs)
        return f'{sum(diffs) / len(diffs):+.1f} ({ahead}/{len(diffs)})'

    return '\n'.join(_rows(scores, columns, cell))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('roots', nargs='+', type=Path, help='folders of ablation workdirs')
    p.add_argument('--out', type=Path, help='JSON Lines file to write the collected rows to')
    p.add_argument(
        '--paired',
        action='store_true',
        help='also print full minus each setting, paired by pretraining seed',
    )
    args = p.parse_args(argv)
    rows = collect(args.roots)
    if not rows:
        sys.exit(f'no */eval.jsonl under {[str(r) for r in args.roots]}')
    if args.out:
        args.out.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    print(table(rows))
    if args.paired:
        print('\nFull minus each setting (points; seeds with full ahead / shared seeds):\n')
        print(paired_table(rows))


if __name__ == '__main__':
    main()
