"""The documentation cannot go stale against the code it describes.

- docs/configuration.md has a table row for every key of every YAML file under conf/, and no row for a key that
  no file has. A row documents a key when its first cell is the key's path in backticks (`train.lr`); a group
  file's keys are prefixed with the group's folder (conf/train/lora.yaml: `train.lr`), a top-level file's and a
  `# @package _global_` file's are not (conf/train.yaml: `output_dir`, `train.objective`). `defaults` and `hydra`
  are Hydra's own entries and are not documented.
- Every relative link in README.md and docs/*.md points to a file that exists, and its `#anchor`, if any, to a
  heading of that file (GitHub's anchors).
"""
from __future__ import annotations

import glob
import os
import re

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "conf")
CONFIG_DOC = os.path.join(ROOT, "docs", "configuration.md")
HYDRA_KEYS = {"defaults", "hydra"}


def _paths(node: dict, prefix: str) -> tuple[set[str], set[str]]:
    """(leaf key paths, every key path) of a mapping: a leaf holds a value that is not a mapping."""
    leaves, every = set(), set()
    for key, value in node.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        every.add(path)
        if isinstance(value, dict) and value:
            sub_leaves, sub_every = _paths(value, path)
            leaves |= sub_leaves
            every |= sub_every
        else:
            leaves.add(path)
    return leaves, every


def conf_keys() -> tuple[dict[str, list[str]], set[str]]:
    """{leaf key path: the files that set it}, and every key path (leaves and the mappings above them)."""
    leaves: dict[str, list[str]] = {}
    every: set[str] = set()
    files = sorted(glob.glob(os.path.join(CONF, "**", "*.yaml"), recursive=True))
    assert files, f"no YAML files under {CONF}"
    for path in files:
        rel = os.path.relpath(path, CONF)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        data = yaml.safe_load(text) or {}
        assert isinstance(data, dict), f"conf/{rel} is not a mapping"
        data = {k: v for k, v in data.items() if k not in HYDRA_KEYS}
        parts = rel.split(os.sep)
        is_global = re.search(r"^#\s*@package\s+_global_\s*$", text, re.MULTILINE) is not None
        prefix = "" if len(parts) == 1 or is_global else ".".join(parts[:-1])
        file_leaves, file_every = _paths(data, prefix)
        for key in file_leaves:
            leaves.setdefault(key, []).append(f"conf/{rel}")
        every |= file_every
    return leaves, every


# a table row whose first cell is one backticked token: `| `train.lr` | ... |`
_KEY_ROW = re.compile(r"^\|\s*`([^`|]+)`\s*\|", re.MULTILINE)


def documented_keys() -> set[str]:
    with open(CONFIG_DOC, encoding="utf-8") as f:
        return set(_KEY_ROW.findall(f.read()))


def test_every_conf_key_is_documented():
    leaves, _ = conf_keys()
    documented = documented_keys()
    missing = sorted(k for k in leaves if k not in documented)
    assert not missing, (
        f"{len(missing)} key(s) under conf/ without a row in docs/configuration.md (add a table row whose first "
        "cell is the key in backticks):\n" + "\n".join(f"  {k}  (set in {', '.join(leaves[k])})" for k in missing))


def test_every_documented_key_exists():
    _, every = conf_keys()
    unknown = sorted(documented_keys() - every)
    assert not unknown, (
        f"{len(unknown)} key(s) documented in docs/configuration.md that no file under conf/ has (renamed or "
        "removed? fix or delete the row):\n" + "\n".join(f"  {k}" for k in unknown))


# ---------------------------------------------------------------------------------------------------------------
# links between README.md and docs/

def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w keeps letters, digits and underscores
    return text.replace(" ", "-")


def anchors(path: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.lstrip().startswith("```"):
                in_code = not in_code
                continue
            m = None if in_code else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
            if m:
                slug = _slug(m.group(1))
                n = seen.get(slug, 0)
                seen[slug] = n + 1
                out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _doc_files() -> list[str]:
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def _links(path: str):
    in_code = False
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.lstrip().startswith("```"):
                in_code = not in_code
                continue
            if in_code:
                continue
            for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line)):
                if not re.match(r"^[a-z]+:", target):  # http:, https:, mailto: are not checked
                    yield n, target


def test_links_between_readme_and_docs_resolve():
    broken = []
    for doc in _doc_files():
        for n, target in _links(doc):
            file_part, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(doc), file_part)) if file_part else doc
            where = f"{os.path.relpath(doc, ROOT)}:{n}: {target}"
            if not os.path.exists(dest):
                broken.append(f"{where} (no such file)")
            elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
                broken.append(f"{where} (no heading with that anchor in {os.path.relpath(dest, ROOT)})")
    assert not broken, "broken links:\n" + "\n".join(f"  {b}" for b in broken)
