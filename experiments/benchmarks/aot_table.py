"""README's "What fits where" table, from the committed `cmid-benchmark --aot` records.

    python experiments/benchmarks/aot_table.py           # print the markdown
    python experiments/benchmarks/aot_table.py --write   # refresh the README section in place

Records: experiments/benchmarks/results/aot_*.jsonl (experiments/benchmarks/run_aot.sh). Per
recipe and remat policy, for each device family: the largest per-device batch that fits (a
multiple of 8, `--aot_max_batch`) and the compiled peak per device at 256 images per device, or
why 256 does not fit. Only measured cells are filled; '-' is still to be run.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / 'experiments' / 'benchmarks' / 'results'
START, END = '<!-- aot-table:start -->', '<!-- aot-table:end -->'
GIB = 2**30
# Device kind (lower case, first match) -> family, in the table's column order.
FAMILIES = (
    ('tpu v4', 'v4'),
    ('tpu v5 lite', 'v5e'),
    ('tpu v5', 'v5p'),
    ('tpu v6 lite', 'v6e'),
    ('h100', 'H100'),
    ('h200', 'H200'),
    ('a100', 'A100-80'),
)
RECIPES = (('vit', 'ViT-B/16'), ('resnet', 'ResNet-50'), ('swin', 'Swin-B'))
POLICIES = ('none', 'dots', 'full')


def family(device_kind: str) -> str:
    kind = device_kind.lower()
    return next(name for key, name in FAMILIES if key in kind)


def load(results: Path = RESULTS) -> list[dict]:
    records = []
    for path in sorted(results.glob('aot_*.jsonl')):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records


def cell(records: list[dict]) -> str:
    at_256 = [
        r for r in records if 'max_per_device_batch' not in r and r['per_device_batch'] == 256
    ]
    largest = [r['max_per_device_batch'] for r in records if 'max_per_device_batch' in r]
    parts = [f'**{largest[-1]}**' if largest else '-']
    if at_256:
        r = at_256[-1]
        if r['fits']:
            parts.append(f'{r["peak_bytes"] / GIB:.1f} GiB')
        elif r['compiler_message']:
            needed = re.search(r'required for HLO temporaries \(([\d.]+G)\)', r['compiler_message'])
            parts.append(f'refused ({needed.group(1)} temps)' if needed else 'refused')
        else:
            parts.append(f'{r["peak_bytes"] / GIB:.1f} > {r["memory_budget_bytes"] / GIB:.1f} GiB')
    else:
        parts.append('-')
    return ' / '.join(parts)


def table(records: list[dict]) -> str:
    columns = [name for _, name in FAMILIES]
    lines = [
        '| recipe | remat | ' + ' | '.join(columns) + ' |',
        '|---|---|' + '---|' * len(columns),
    ]
    for arch, label in RECIPES:
        for policy in POLICIES:
            row = [
                cell(
                    [
                        r
                        for r in records
                        if r['arch'] == arch
                        and r['remat'] == policy
                        and family(r['device_kind']) == name
                        and r['image_size'] == 224
                    ]
                )
                for name in columns
            ]
            lines.append(f'| {label} | {policy} | ' + ' | '.join(row) + ' |')
    versions = sorted({json.dumps(r['versions'], sort_keys=True) for r in records})
    lines.append('')
    lines.append(
        'Compiled with '
        + '; '.join(', '.join(f'{k} {v}' for k, v in json.loads(v).items() if v) for v in versions)
        + '.'
        if versions
        else 'No records yet.'
    )
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--write', action='store_true', help='Rewrite the README section.')
    args = parser.parse_args()
    text = table(load())
    if not args.write:
        print(text)
        return
    readme = ROOT / 'README.md'
    content = readme.read_text()
    head, rest = content.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f'{head}{START}\n{text}\n{END}{tail}')


if __name__ == '__main__':
    main()
