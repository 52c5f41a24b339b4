"""Every repository path the docs name exists, and no file names a path of one machine.

Scanned for paths: README.md, docs/*.md, every README.md under experiments/ and the package's
demo-data notes. A path is a token in backticks or a markdown link target that

* starts with a top-level entry of the repository (`cmid_jax/...`, `configs/...`, `tests/...`),
  resolved from the repository root, or with a folder of the package (`models/vit.py`, resolved
  under cmid_jax/; `models/heads.MIMDecoder` names models/heads.py), or is a relative link,
  resolved from the file that holds it, and ends in a file suffix (a folder such as `data/AID`
  is the user's);
* or is a dotted module (`cmid_jax.tools.export`, `python -m cmid_jax.main`), which must be a
  module or package of the repository.

Tokens with placeholders (`DIR`, `...`, `*`, `<`, `{`) are not paths; paths of other
repositories are written with the repository's name first (`big_vision/configs/...`). Every
tracked text file outside tests/ is scanned for absolute paths under the roots that machines keep
their users' and services' files in (`MACHINE_ROOTS`).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / 'cmid_jax'
SUFFIXES = ('.py', '.md', '.sh', '.ipynb', '.toml', '.txtpb', '.jsonl', '.png', '.tif')
BACKTICKED = re.compile(r'`([^`\s]+)`')
LINK = re.compile(r'\]\(([^)\s#]+)(?:#[^)]*)?\)')
MODULE = re.compile(r'\bcmid_jax(?:\.[a-z_][a-z0-9_]*)+')
PLACEHOLDER = re.compile(r'\.\.\.|[*<>{}$]|\bDIR\b|^[A-Z_]+/')
# Top-level folders of a machine's users, services and scratch space.
MACHINE_ROOTS = ('home', 'root', 'work', 'tmp', 'mnt', 'Users', 'scratch')
MACHINE_PATH = re.compile(rf'(?<![\w.~])/(?:{"|".join(MACHINE_ROOTS)})/')


def documents() -> list[Path]:
    docs = [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]
    docs += sorted((REPO / 'experiments').rglob('README.md'))
    docs += sorted((PACKAGE / 'demo_data').glob('*.md'))
    return docs


def repository_files() -> set[str]:
    out = subprocess.run(
        ['git', 'ls-files', '--cached', '--others', '--exclude-standard'],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(out.split())


# Top-level entries of the repository's files (not of the folder: runs/ and the like are ignored).
TOP_LEVEL = {name.split('/')[0] for name in repository_files()}


def path_problem(token: str, doc: Path) -> str | None:
    """Why `token`, named in `doc`, does not resolve; None if it does or is not a path of ours."""
    token = token.strip('`\'"();').rstrip('.,:').removeprefix('./')
    if '=' in token:
        token = token.split('=', 1)[1]
    if not token or PLACEHOLDER.search(token) or ':' in token or token.startswith(('-', '/')):
        return None
    first, _, rest = token.partition('/')
    if not rest:
        return None
    if first == '..':
        candidates = [doc.parent / token]
    elif first in TOP_LEVEL:
        candidates = [REPO / token]
    elif (PACKAGE / first).is_dir():
        candidates = [PACKAGE / token]
    else:
        return None  # a user's folder, a workdir's files, another repository's paths
    stem, dot, attribute = token.rpartition('.')
    if not token.endswith(SUFFIXES):
        if not (dot and attribute.isidentifier() and '/' in stem):
            return None  # a folder the user makes (`data/AID`), not a file of ours
        candidates = [c.parent / (Path(stem).name + '.py') for c in candidates]  # `models/heads.X`
    if not any(c.resolve().exists() for c in candidates):
        return f'{doc.relative_to(REPO)}: {token} does not exist'
    return None


def module_problem(name: str, doc: Path) -> str | None:
    """Why dotted `name` is neither a module or package of ours nor `module.attribute` (a name
    inside a module file, e.g. `cmid_jax.models.vit.build`); None if it is one of those."""
    path = REPO.joinpath(*name.split('.'))
    if path.with_suffix('.py').is_file() or (path / '__init__.py').is_file():
        return None
    if path.parent.with_suffix('.py').is_file():
        return None
    init = path.parent / '__init__.py'  # A name a package exports, e.g. `cmid_jax.data.load_image`.
    if init.is_file() and re.search(rf'\b{path.name}\b', init.read_text(encoding='utf-8')):
        return None
    return f'{doc.relative_to(REPO)}: no module {name}'


def problems_in(doc: Path) -> list[str]:
    text = doc.read_text(encoding='utf-8')
    found = []
    for token in BACKTICKED.findall(text) + LINK.findall(text):
        for part in token.split(','):
            problem = path_problem(part, doc)
            if problem:
                found.append(problem)
    for name in MODULE.findall(text):
        problem = module_problem(name, doc)
        if problem:
            found.append(problem)
    return sorted(set(found))


def test_every_path_the_docs_name_exists():
    problems = [p for doc in documents() for p in problems_in(doc)]
    assert not problems, '\n'.join(problems)


def test_no_file_names_a_path_of_one_machine():
    hits = []
    for name in sorted(repository_files()):
        if name.startswith('tests/') or name.endswith(('.png', '.tif')):
            continue
        try:
            text = (REPO / name).read_text(encoding='utf-8')
        except (UnicodeDecodeError, FileNotFoundError):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if MACHINE_PATH.search(line):
                hits.append(f'{name}:{number}: {line.strip()[:120]}')
    assert not hits, '\n'.join(hits)


def test_the_checks_catch_what_they_look_for():
    doc = REPO / 'docs' / 'README.md'
    for missing in ('cmid_jax/models/no_such.py', 'models/no_such.py', 'models/heads.NoSuch.py'):
        assert path_problem(missing, doc), missing
    assert path_problem('models/no_such.Thing', doc)
    assert path_problem('../README_not_here.md', doc)
    for fine in (
        'cmid_jax/models/vit.py',
        'models/vit.py',
        'models/heads.MIMDecoder',
        '../README.md',
        'runs/vitb/config.json',
        '--workdir=runs/demo',
        'data/AID',
        'Pretrain/models/vit.py',  # another repository's path
        'big_vision/configs/vit_s16_i1k.py',
    ):
        assert path_problem(fine, doc) is None, fine
    assert module_problem('cmid_jax.tools.no_such', doc)
    assert module_problem('cmid_jax.models.vit.build', doc) is None
    assert module_problem('cmid_jax.data.load_image', doc) is None
    assert module_problem('cmid_jax.data.no_such_name', doc)
    for root in MACHINE_ROOTS:  # Built here, so this file names no machine path itself.
        assert MACHINE_PATH.search(f'--workdir=/{root}/run') and MACHINE_PATH.search(f'"/{root}/x"')
        assert not MACHINE_PATH.search(f'gs://bucket/{root}/x')
    assert not MACHINE_PATH.search('DATA=/path/to/AID')
