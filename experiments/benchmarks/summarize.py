"""Prints the benchmark JSON lines (cmid_jax and PyTorch reference) as one Markdown table.

    python experiments/benchmarks/summarize.py runs/benchmarks_gpu.jsonl

Standard library only, so it runs wherever the benchmarks ran. Lines that are not JSON records
(a crashed run's partial output) are skipped.
"""

from __future__ import annotations

import json
import sys

NAMES = {('vit', 'B/16'): 'ViT-B/16', ('resnet', '50'): 'ResNet-50', ('swin', 'B'): 'Swin-B'}
COLUMNS = (
    'backbone',
    'implementation',
    'options',
    'batch',
    'img/s',
    'step ms (mean / median)',
    'MFU',
    'peak memory GiB',
    'compile s',
    'device',
)


def options(r: dict) -> str:
    """What distinguishes rows of one backbone: attention, remat, torch.compile, layout, data."""
    parts = [r.get('compute_dtype', '')]
    if r.get('attention_impl'):
        parts.append(f'{r["attention_impl"]} attention')
    if r['implementation'] == 'jax':
        parts.append(f'remat {r.get("remat")}')
    else:
        command = r.get('config') or ''
        parts.append('compile' if '--compile' in command else 'eager')
        if '--channels-last' in command:
            parts.append('channels-last')
    if r.get('data') == 'pipeline':
        parts.append('pipeline')
    return ', '.join(p for p in parts if p)


def fmt(value, spec: str) -> str:
    return '–' if value is None else format(value, spec)


def row(r: dict) -> list[str]:
    memory = r.get('peak_memory_bytes')
    return [
        NAMES.get((r['arch'], r['variant']), f'{r["arch"]} {r["variant"]}'),
        'cmid_jax' if r['implementation'] == 'jax' else 'PyTorch',
        options(r),
        str(r['global_batch']),
        fmt(r['images_per_sec'], ',.0f'),
        f'{r["step_time_ms_mean"]:.1f} / {r["step_time_ms_median"]:.1f}',
        fmt(r.get('mfu') and 100 * r['mfu'], '.1f') + ('%' if r.get('mfu') else ''),
        fmt(memory and memory / 2**30, '.1f'),
        fmt(r.get('compile_time_s'), '.0f'),
        r.get('device_kind', ''),
    ]


def table(records: list[dict]) -> str:
    lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
    lines += ['| ' + ' | '.join(row(r)) + ' |' for r in records]
    return '\n'.join(lines)


def read(path: str) -> list[dict]:
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and 'images_per_sec' in record:
                records.append(record)
    return records


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f'usage: {argv[0]} RESULTS.jsonl', file=sys.stderr)
        return 2
    print(table(read(argv[1])))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
