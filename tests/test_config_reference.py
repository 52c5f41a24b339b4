"""README.md's config reference is generated from the code and stays in step with it."""

from cmid_jax import config_base
from cmid_jax.tools import config_reference

from conftest import REPO


def test_readme_config_reference_is_current():
    readme = (REPO / 'README.md').read_text(encoding='utf-8')
    assert config_reference.readme_section(readme) == config_reference.reference(), (
        'README.md is stale: run `python -m cmid_jax.tools.config_reference --write`'
    )


def test_every_field_has_a_row_and_a_description():
    table = config_reference.reference()
    rows = [line for line in table.splitlines()[2:]]
    assert len(rows) == len(list(config_reference._leaves(config_base.default_config())))
    assert all(not line.endswith('|  |') for line in rows), [r for r in rows if r.endswith('|  |')]
    assert '| `loss.queue_size` | `65536` | Negative keys' in table
