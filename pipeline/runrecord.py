"""One run record: what made a run's results, and the one rule for a rerun whose settings changed.

Every job that writes results others build on (a training run folder, an inference output
prefix, a distillation work dir, an ingested dataset) keeps a JSON record of its
result-changing settings next to them. A rerun into the same place is compared with it:

* same settings (keys in ``ignore`` aside): the same run, so it resumes / skips finished work;
* different: refused with one line naming the first differences, unless the user passes the
  job's override flag (``--resume-anyway`` to continue under the new settings,
  ``--overwrite`` to recompute), which logs them instead.

``ignore`` is derived from the config classes (:func:`pipeline.config.run_only_keys`), never
retyped per job::

    diff = runrecord.check(uri, settings, ignore=run_only_keys(TrainConfig),
                           what=f"run {name} in {run_uri}", flag="--resume-anyway",
                           alternative="pick a new name (--set name=...)", override=resume_anyway)
    runrecord.write(uri, settings)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from pipeline.config import ConfigError, flatten

logger = logging.getLogger(__name__)

SHOWN = 6  # differences named in one message


class RunChangedError(ConfigError):
    """A rerun's result-changing settings differ from the record of the results already there.
    ``change``: what differs, without the way out the message names (a caller with its own way
    out, such as ``maskray demo --fresh``, words its message from it)."""

    def __init__(self, message: str, change: str | None = None) -> None:
        super().__init__(message)
        self.change = change or message


def differences(old: dict[str, Any], new: dict[str, Any], ignore: Iterable[str] = (),
                defaults: dict[str, Any] | None = None) -> list[str]:
    """Dotted keys whose values differ between two settings mappings, except keys under ``ignore``
    (a key ``a`` in ``ignore`` covers ``a`` and every ``a.*``). ``defaults`` (dotted key -> value,
    :func:`pipeline.config.field_defaults`): what a key absent from ``old`` stands for, since a
    record written before a setting existed was made with its default (a new setting's default
    keeps the old behaviour)."""
    ignore = tuple(ignore)
    a, b = flatten(old), flatten(new)
    for key in set(b) - set(a):
        if key in (defaults or {}):
            a[key] = defaults[key]

    def ignored(key: str) -> bool:
        return any(key == i or key.startswith(i + ".") for i in ignore)

    return sorted(k for k in set(a) | set(b) if not ignored(k) and a.get(k) != b.get(k))


def describe(old: dict[str, Any], new: dict[str, Any], keys: list[str]) -> str:
    """``"k (old -> new), ..."`` for the first :data:`SHOWN` keys, then ``" and N more"``."""
    a, b = flatten(old), flatten(new)
    shown = ", ".join(f"{k} ({a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r})" for k in keys[:SHOWN])
    return shown + (f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else "")


def read(uri: str) -> dict[str, Any] | None:
    """The record at ``uri`` (None when there is none); an unreadable one is a one-line error."""
    from pipeline import storage

    if not storage.exists(uri):
        return None
    try:
        data = json.loads(storage.read_bytes(uri))
    except ValueError as exc:
        raise RunChangedError(f"{uri}: not readable JSON ({exc}); move it away or choose another location") from None
    if not isinstance(data, dict):
        raise RunChangedError(f"{uri}: expected a JSON object, got {type(data).__name__}")
    return data


def write(uri: str, settings: dict[str, Any]) -> None:
    """Record ``settings`` at ``uri`` (one small JSON object, written whole)."""
    from pipeline import storage

    storage.write_bytes(uri, (json.dumps(settings, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def compare(old: dict[str, Any] | None, settings: dict[str, Any], *, ignore: Iterable[str], what: str,
            flag: str, alternative: str, override: bool, defaults: dict[str, Any] | None = None) -> list[str]:
    """The rule on an already-read record: the differing keys, or :class:`RunChangedError`.

    The message: ``"<what> was made with other settings: k (a -> b), ...; pass <flag> to <verb>,
    or <alternative>"``; with ``override`` the same is logged as a warning and the keys returned.
    """
    if old is None:
        return []
    diff = differences(old, settings, ignore, defaults)
    if not diff:
        return []
    verb = "recompute them" if flag == "--overwrite" else "continue under these settings"
    text = f"{what} was made with other settings: {describe(old, settings, diff)}"
    if not override:
        raise RunChangedError(f"{text}; pass {flag} to {verb}, or {alternative}", change=text)
    logger.warning("%s (%s given: going on)", text, flag)
    return diff


def check(uri: str, settings: dict[str, Any], *, ignore: Iterable[str], what: str, flag: str,
          alternative: str, override: bool, defaults: dict[str, Any] | None = None) -> list[str]:
    """:func:`compare` ``settings`` with the record at ``uri`` (nothing recorded: no difference)."""
    return compare(read(uri), settings, ignore=ignore, what=what, flag=flag, alternative=alternative,
                   override=override, defaults=defaults)
