"""Collects the evaluations of ablation workdirs into one JSON Lines file and a markdown table.

    python experiments/ablation/collect.py runs/ablation_aid10k* --out experiments/ablation/results.jsonl

Each workdir's `eval.jsonl` (written by `python -m cmid_jax.tools.evaluate`) gets the setting and the
pretraining seed read from its `config.json`; the table gives, per backbone, setting and protocol,
the mean over seeds first and each seed's value after it: top-1 (%) for kNN and the linear probe,
mIoU (%) for segmentation and the change class's F1 (%) for change detection, one column per
dense data set.
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
DENSE_METRIC = {'segmentation': 'miou', 'change': 'f1'}


def column(row: dict) -> str:
    """The table column of an evaluation: its protocol, and for a dense one its data set and
    head."""
    if row['protocol'] in DENSE_METRIC:
        return (
            f'{row["protocol"]} {Path(row["data"]).name} {row["head"]} '
            f'({DENSE_METRIC[row["protocol"]]})'
        )
    return row['protocol']


def score(row: dict) -> float:
    return 100 * row[DENSE_METRIC.get(row['protocol'], 'top1')]


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
                        setting=setting_of(config, r['step']),
                        pretrain_seed=config['seed'],
                        workdir=str(evals.parent),
                    )
                )
    return rows


def table(rows: list[dict]) -> str:
    scores = collections.defaultdict(list)
    for r in sorted(rows, key=lambda r: r['pretrain_seed']):
        scores[(r['arch'], r['variant'], r['setting'], column(r))].append(score(r))
    columns = [p for p in PROTOCOLS if any(k[3] == p for k in scores)]
    columns += sorted({k[3] for k in scores} - set(PROTOCOLS))
    lines = [
        '| backbone | setting | ' + ' | '.join(columns) + ' |',
        '|---|---|' + '---|' * len(columns),
    ]
    for arch, variant in sorted({(k[0], k[1]) for k in scores}):
        for setting in SETTINGS:
            cells = []
            for protocol in columns:
                values = scores.get((arch, variant, setting, protocol))
                if not values:
                    cells.append('')
                    continue
                mean = sum(values) / len(values)
                each = ' / '.join(f'{v:.1f}' for v in values)
                cells.append(f'{mean:.1f}' + (f' ({each})' if len(values) > 1 else ''))
            if any(cells):
                lines.append(f'| {arch} {variant} | {setting} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('roots', nargs='+', type=Path, help='folders of ablation workdirs')
    p.add_argument('--out', type=Path, help='JSON Lines file to write the collected rows to')
    args = p.parse_args(argv)
    rows = collect(args.roots)
    if not rows:
        sys.exit(f'no */eval.jsonl under {[str(r) for r in args.roots]}')
    if args.out:
        args.out.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    print(table(rows))


if __name__ == '__main__':
    main()
