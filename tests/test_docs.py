"""Every citation of docs/cmid-method.md and docs/jax-practices.md resolves (no jax import).

The repository's .py, .md, .sh and .ipynb files (notebooks: cell sources only) are scanned for

* section citations: `cmid-method.md section 8`, `cmid-method.md, sections 3-8`,
  `cmid-method.md 10.4`, `jax-practices §11.6`, `jax-practices §13-14`, `§6.1 of cmid-method.md`;
* bare `§N.M`: it belongs to the doc named last before it in the same file, except `pitfall §N`,
  which is jax-practices (its pitfall list is §11). Inside docs/cmid-method.md and
  docs/jax-practices.md a bare `§` is the file's own section;
* quirk and decision tags `Q<n>` / `D<n>`.

A section resolves if the doc has a heading `## N. Title` (section) or `### N.M Title`
(subsection); for an integer range N-M every section from N to M must exist. A `Q<n>` must be a
row of cmid-method.md's quirk table (`| Qn | ...`), a `D<n>` a `### Dn. Title` heading under
`## Decisions for cmid_jax`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / 'docs'
THIS = Path(__file__).resolve()
METHOD, PRACTICES = 'cmid-method', 'jax-practices'
SUFFIXES = ('.py', '.md', '.sh', '.ipynb')
# Never scanned: VCS and tool folders anywhere; outputs and data at the top level.
SKIP_ANYWHERE = {'__pycache__', 'node_modules', 'venv', 'site-packages'}
SKIP_TOP = {'docs', 'runs', 'build', 'dist', 'data'}

_SEC = r'\d+(?:\.\d+)*'
_REF = rf'(?P<ref>{_SEC}(?:\s*[-–]\s*§?{_SEC})?)(?![\d.]*\d)'
_DOC = rf'(?P<doc>{METHOD}|{PRACTICES})'
# `<doc>[.md][,] [section(s)|§] REF`, and the reverse `section(s)|§ REF of|in <doc>`.
CITE = re.compile(rf'{_DOC}(?:\.md)?[`\'"]*,?\s*(?:(?:sections?|§)\s*)?{_REF}')
CITE_REVERSED = re.compile(rf'(?:sections?|§)\s*{_REF}\s+(?:of|in)\s+[`\'"]*(?:docs/)?{_DOC}')
BARE = re.compile(rf'§\s*{_REF}')
DOC_NAME = re.compile(_DOC)
PITFALL = re.compile(r'pitfall\s*$', re.IGNORECASE)
TAG = re.compile(r'\b(?P<kind>[QD])(?P<num>\d+)\b')

HEADING = re.compile(r'^#{2,6}\s+(\d+(?:\.\d+)*)\.?(?=\s|$)', re.MULTILINE)
QUIRK_ROW = re.compile(r'^\|\s*(Q\d+)\s*\|', re.MULTILINE)
DECISIONS = re.compile(
    r'^## Decisions for cmid_jax\s*$(?P<body>.*?)(?=^## |\Z)', re.MULTILINE | re.DOTALL
)
DECISION = re.compile(r'^###\s+(D\d+)\.', re.MULTILINE)


def sections(doc: str) -> set[str]:
    return set(HEADING.findall((DOCS / f'{doc}.md').read_text(encoding='utf-8')))


def tags() -> set[str]:
    text = (DOCS / f'{METHOD}.md').read_text(encoding='utf-8')
    decisions = DECISIONS.search(text)
    return set(QUIRK_ROW.findall(text)) | set(
        DECISION.findall(decisions.group('body')) if decisions else ()
    )


def missing_sections(ref: str, known: set[str]) -> list[str]:
    """Sections named by `ref` ('8', '10.4', '3-8', '§13-14') that are not in `known`."""
    ends = [e.strip().lstrip('§') for e in re.split(r'[-–]', ref)]
    if len(ends) == 2 and all(e.isdigit() for e in ends):
        lo, hi = int(ends[0]), int(ends[1])
        if lo > hi:
            return [ref]
        ends = [str(n) for n in range(lo, hi + 1)]
    return [e for e in ends if e not in known]


def check_text(
    label: str,
    text: str,
    headings: dict[str, set[str]],
    known_tags: set[str],
    own_doc: str | None = None,
) -> tuple[list[str], int]:
    """Returns (errors, number of citations checked) for one file's text.

    `own_doc`: the doc this text is (bare `§` then means its own sections).
    """
    errors, count = [], 0
    line = lambda pos: text.count('\n', 0, pos) + 1
    covered = []
    for pattern in (CITE, CITE_REVERSED):
        for m in pattern.finditer(text):
            if any(a <= m.start() < b for a, b in covered):
                continue
            covered.append(m.span())
            count += 1
            bad = missing_sections(m.group('ref'), headings[m.group('doc')])
            if bad:
                errors.append(
                    f'{label}:{line(m.start())}: {m.group(0)!r}: no heading '
                    f'{", ".join(bad)} in docs/{m.group("doc")}.md'
                )
    for m in BARE.finditer(text):
        if any(a <= m.start() < b for a, b in covered):
            continue
        count += 1
        if PITFALL.search(text, max(0, m.start() - 20), m.start()):
            doc = PRACTICES
        elif own_doc:
            doc = own_doc
        else:
            named = [d.group('doc') for d in DOC_NAME.finditer(text, 0, m.start())]
            if not named:
                errors.append(
                    f'{label}:{line(m.start())}: {m.group(0)!r}: bare § with no '
                    f'{METHOD}.md or {PRACTICES} named before it in the file'
                )
                continue
            doc = named[-1]
        bad = missing_sections(m.group('ref'), headings[doc])
        if bad:
            errors.append(
                f'{label}:{line(m.start())}: {m.group(0)!r} (read as {doc}): no '
                f'heading {", ".join(bad)} in docs/{doc}.md'
            )
    for m in TAG.finditer(text):
        count += 1
        if m.group(0) not in known_tags:
            where = (
                'quirk table (§12.3)' if m.group('kind') == 'Q' else '"Decisions for cmid_jax" list'
            )
            errors.append(
                f'{label}:{line(m.start())}: {m.group(0)} is not in the {where} of docs/{METHOD}.md'
            )
    return errors, count


def file_text(path: Path) -> str:
    raw = path.read_text(encoding='utf-8', errors='replace')
    if path.suffix != '.ipynb':
        return raw
    try:
        cells = json.loads(raw).get('cells', [])
    except ValueError:
        return raw
    # Sources only: outputs (base64 images, logs) are not citations.
    return '\n'.join(
        ''.join(c.get('source', ''))
        if isinstance(c.get('source'), list)
        else str(c.get('source', ''))
        for c in cells
    )


def repo_files() -> list[Path]:
    out = []
    for root, dirs, files in os.walk(REPO):
        top = Path(root) == REPO
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith('.')
            and d not in SKIP_ANYWHERE
            and not d.endswith('.egg-info')
            and not (top and d in SKIP_TOP)
        )
        out += [
            Path(root) / f
            for f in sorted(files)
            if f.endswith(SUFFIXES) and (Path(root) / f).resolve() != THIS
        ]
    return out


def _context():
    return {METHOD: sections(METHOD), PRACTICES: sections(PRACTICES)}, tags()


def test_docs_exist_with_numbered_headings():
    headings, known = _context()
    for doc, last in ((METHOD, 12), (PRACTICES, 14)):
        assert {str(n) for n in range(1, last + 1)} <= headings[doc], (doc, sorted(headings[doc]))
    assert {f'Q{n}' for n in range(1, 12)} | {f'D{n}' for n in range(1, 8)} <= known
    assert (DOCS / 'README.md').is_file()


def test_repository_citations_resolve():
    headings, known = _context()
    errors, counts = [], {}
    for path in repo_files():
        label = str(path.relative_to(REPO))
        err, n = check_text(label, file_text(path), headings, known)
        errors += err
        counts[label] = n
    assert not errors, 'unresolved doc citations:\n' + '\n'.join(errors)
    # Guard against a scan that silently finds nothing (e.g. a broken pattern).
    assert sum(counts.values()) > 0 and counts.get('cmid_jax/optim.py', 0) > 0, counts


def test_cross_references_inside_docs_resolve():
    headings, known = _context()
    errors = []
    for path in sorted(DOCS.glob('*.md')):
        own = path.stem if path.stem in headings else None
        errors += check_text(
            f'docs/{path.name}', path.read_text(encoding='utf-8'), headings, known, own_doc=own
        )[0]
    assert not errors, 'unresolved references inside docs/:\n' + '\n'.join(errors)


def test_checker_catches_broken_citations():
    """The checker itself fails on citations that do not resolve (and passes good ones)."""
    headings, known = _context()
    good = (
        'cmid-method.md, sections 3-8; cmid-method.md 10.4; jax-practices §13-14; '
        'jax-practices §11.6 then §12.2; pitfall §11.4; (Q1, D5-D6); '
        '§6.1 of cmid-method.md'
    )
    assert check_text('good', good, headings, known) == ([], 10)
    bad = {
        'cmid-method.md section 99': 'no heading 99',
        'cmid-method.md 10.9': 'no heading 10.9',
        'cmid-method.md sections 12-15': 'no heading 13, 14, 15',
        'jax-practices §11.99': 'no heading 11.99',
        'cmid-method.md and then §6.7': 'read as cmid-method',
        'pitfall §11.77': 'read as jax-practices',
        'a bare §3 first': 'bare §',
        'quirk Q12': 'Q12 is not in the quirk table',
        'decision D8': 'D8 is not in the "Decisions',
    }
    for text, message in bad.items():
        errors, _ = check_text('bad', text, headings, known)
        assert len(errors) == 1 and message in errors[0], (text, errors)
