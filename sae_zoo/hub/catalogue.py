"""The catalogue of public SAEs: ``catalogue.yaml`` in this package, one block per release (see its header).

``list_pretrained("gemma*")`` lists ``release/sae_id`` names; ``load_sae("release/sae_id")`` loads one
from its Hub repo, with the LM, hook and normalisation of the entry in its provenance. Adding a release
is one block of YAML, no code.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import itertools
import string
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import yaml

CATALOGUE = "catalogue.yaml"
#: the keys of a release block; every one but the last three is required (hook_out: a transcoder's target hook)
RELEASE_KEYS = ("repo_id", "format", "model", "normalization", "id", "path", "hook", "values", "hook_out",
                "description", "url")
NORMALIZATIONS = ("none", "expected_average_only_in")


@dataclass(frozen=True)
class CatalogueEntry:
    """One public SAE: where it lives and what it reads."""

    release: str
    sae_id: str
    repo_id: str
    path: str
    format: str
    model: str
    hook: str
    normalization: str
    #: a transcoder's: the hook it writes (its target); None for an SAE
    hook_out: str | None = None

    @property
    def name(self) -> str:
        return f"{self.release}/{self.sae_id}"

    def provenance(self) -> dict[str, Any]:
        return {"catalogue": self.name, "model_name": self.model, "hook_name": self.hook,
                "normalize_activations": self.normalization,
                **({"hook_name_out": self.hook_out} if self.hook_out else {})}


def _combinations(values: Any, where: str) -> list[dict[str, Any]]:
    blocks = values if isinstance(values, list) else [values]
    out = []
    for block in blocks:
        if not isinstance(block, dict) or not all(isinstance(v, list) and v for v in block.values()):
            raise ValueError(f"{where}: 'values' must map names to non-empty lists (or be a list of such maps)")
        out += [dict(zip(block, combo)) for combo in itertools.product(*block.values())]
    return out


def _fill(pattern: str, values: dict[str, Any], where: str) -> str:
    names = {name for _, name, _, _ in string.Formatter().parse(pattern) if name}
    if names - set(values):
        raise ValueError(f"{where}: the pattern {pattern!r} names {sorted(names - set(values))}, not in 'values'")
    return pattern.format(**values)


def _release(name: str, block: Any) -> list[CatalogueEntry]:
    where = f"{CATALOGUE}: release {name!r}"
    if not isinstance(block, dict):
        raise ValueError(f"{where} must be a mapping of {', '.join(RELEASE_KEYS)}")
    missing = [key for key in RELEASE_KEYS[:-3] if key not in block]
    unknown = [key for key in block if key not in RELEASE_KEYS]
    if missing or unknown:
        raise ValueError(f"{where}: " + "; ".join(filter(None, [missing and f"missing {', '.join(missing)}",
                                                                 unknown and f"unknown keys {', '.join(unknown)}"])))
    if block["normalization"] not in NORMALIZATIONS:
        raise ValueError(f"{where}: normalization {block['normalization']!r} is not one of {', '.join(NORMALIZATIONS)}")
    entries = []
    for values in _combinations(block["values"], where):
        fill = functools.partial(_fill, values=values, where=where)
        entries.append(CatalogueEntry(name, fill(block["id"]), block["repo_id"], fill(block["path"]), block["format"],
                                      block["model"], fill(block["hook"]), block["normalization"],
                                      fill(block["hook_out"]) if "hook_out" in block else None))
    return entries


@functools.lru_cache(maxsize=1)
def catalogue() -> dict[str, CatalogueEntry]:
    """Every entry, by ``release/sae_id``, in the file's order."""
    data = yaml.safe_load(files("sae_zoo.hub").joinpath(CATALOGUE).read_text())
    entries: dict[str, CatalogueEntry] = {}
    for release, block in data.items():
        for entry in _release(release, block):
            if entry.name in entries:
                raise ValueError(f"{CATALOGUE}: {entry.name!r} is listed twice")
            entries[entry.name] = entry
    return entries


def releases() -> list[str]:
    return list(dict.fromkeys(entry.release for entry in catalogue().values()))


def list_pretrained(pattern: str = "*") -> list[str]:
    """The catalogue's ``release/sae_id`` names matching the shell-style ``pattern``, in catalogue order."""
    return [name for name in catalogue() if fnmatch.fnmatchcase(name, pattern)]


def find_entry(name: str) -> CatalogueEntry | None:
    """The entry ``name`` (``release/sae_id``) names; None when its first part is no release. A known
    release with an unknown id raises a ``ValueError`` listing the release's close ids."""
    release, _, sae_id = name.partition("/")
    if release not in releases():
        return None
    entry = catalogue().get(name)
    if entry is None:
        ids = [e.sae_id for e in catalogue().values() if e.release == release]
        close = difflib.get_close_matches(sae_id, ids, n=5, cutoff=0.5)
        raise ValueError(f"the catalogue's release {release!r} has no SAE {sae_id!r}"
                         + (f"; close matches: {', '.join(close)}" if close else f"; it has {len(ids)}, e.g. {ids[0]}")
                         + f" (list them with sae_zoo.list_pretrained({release + '/*'!r}))")
    return entry


def close_releases(name: str) -> str:
    """A hint naming the catalogue releases close to ``name``'s first part ('' when none is)."""
    close = difflib.get_close_matches(name.partition("/")[0], releases(), n=5, cutoff=0.6)
    return f"; catalogue releases close to it: {', '.join(close)}" if close else ""
