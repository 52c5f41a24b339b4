"""The config reference in README.md, generated from `config_base.default_config`.

  python -m cmid_jax.tools.config_reference            # print the markdown table
  python -m cmid_jax.tools.config_reference --write    # refresh the README section in place

Each field's description is the comment on its line in `config_base.py` or the comment block
just above it; the default is the value `default_config()` returns. A test keeps README.md in
step with the code.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from absl import app, flags

from cmid_jax import config_base, errors

_WRITE = flags.DEFINE_bool('write', False, 'Rewrite the README section in place.')

START, END = '<!-- config-reference:start -->', '<!-- config-reference:end -->'
_FIELD = re.compile(
    r'^\s*c\.([\w.]+)\s*=\s*(?!ml_collections\.ConfigDict\(\))(.*?)(?:\s+#\s*(.*))?$'
)


def _descriptions() -> dict[str, str]:
    """field -> comment text, from the source of `default_config`."""
    out, pending = {}, []
    for line in inspect.getsource(config_base.default_config).splitlines():
        stripped = line.strip()
        if stripped.startswith('#'):
            pending.append(stripped.lstrip('# ').strip())
            continue
        match = _FIELD.match(line)
        if match:
            out[match.group(1)] = ' '.join(pending + [match.group(3) or '']).strip()
        pending = [] if not stripped.startswith('#') else pending
    return out


def _leaves(config, prefix: str = ''):
    for key, value in config.items():
        name = f'{prefix}{key}'
        if hasattr(value, 'items'):
            yield from _leaves(value, name + '.')
        else:
            yield name, value


def reference() -> str:
    notes = _descriptions()
    rows = ['| field | default | meaning |', '|---|---|---|']
    for name, value in _leaves(config_base.default_config()):
        shown = 'None' if value is None else repr(value)
        rows.append(f'| `{name}` | `{shown}` | {notes.get(name, "").replace("|", "/")} |')
    return '\n'.join(rows)


def _bounds(readme_text: str) -> tuple[int, int]:
    return readme_text.index(START) + len(START), readme_text.index(END)


def readme_section(readme_text: str) -> str:
    start, end = _bounds(readme_text)
    return readme_text[start:end].strip()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    table = reference()
    if not _WRITE.value:
        print(table)
        return
    readme = Path(__file__).resolve().parents[2] / 'README.md'
    text = readme.read_text(encoding='utf-8')
    start, end = _bounds(text)
    readme.write_text(text[:start] + '\n' + table + '\n' + text[end:], encoding='utf-8')


def run() -> None:
    errors.run(main)


if __name__ == '__main__':
    run()
