"""Path values in configs: plain paths, URLs and hub ids pass through; "<scheme>:<rest>" goes to
the resolver registered for the scheme.

    resolve_path("/models/opt-6.7b")   -> "/models/opt-6.7b"
    resolve_path("https://.../x.pth")  -> unchanged (checkpoint URLs are downloaded later)
    resolve_path("toy:opt-small")      -> a directory of the offline toy zoo

Resolvers are found under the entry-point group `lavis_vpgtrans.path_schemes` (setup.py: the
toy package adds "toy"), loaded on the scheme's first use, so this package never imports
them itself; `register_scheme` adds one at run time.
"""

import os
import re
from importlib.metadata import entry_points
from typing import Callable, Dict

ENTRY_POINT_GROUP = "lavis_vpgtrans.path_schemes"
# the lavis_vpgtrans directory: the model-type and dataset yamls are named relative to it
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A scheme is a lower-case word of two or more characters before the first ":", not followed
# by "//": a Windows drive ("C:\\...") and URLs ("https://...", "s3://...") are not schemes.
_SCHEME = re.compile(r"^(?P<scheme>[a-z][a-z0-9_]+):(?!//)")

_resolvers: Dict[str, Callable[[str], str]] = {}


class UnknownSchemeError(ValueError):
    """A path value names a scheme no resolver is registered for."""


def register_scheme(scheme: str, resolver: Callable[[str], str]) -> None:
    """`resolver(value)` gets the whole value ("toy:opt-small") and returns a path."""
    _resolvers[scheme] = resolver


def known_schemes() -> list:
    return sorted(set(_resolvers) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def _resolver(scheme: str, value: str) -> Callable[[str], str]:
    if scheme not in _resolvers:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == scheme]
        if not found:
            raise UnknownSchemeError(
                f"{value!r}: unknown path scheme {scheme!r}; known schemes: {', '.join(known_schemes()) or 'none'} "
                f"(registered as '{ENTRY_POINT_GROUP}' entry points of an installed package)")
        _resolvers[scheme] = found[0].load()
    return _resolvers[scheme]


def resolve_path(value):
    """`value` unchanged unless it starts with "<scheme>:"; then the scheme's resolver's path.
    A file or directory that exists under the literal name (e.g. "run:1.pth") is never
    taken for a scheme. Non-strings (None, numbers) pass through."""
    if not isinstance(value, str):
        return value
    match = _SCHEME.match(value)
    if match is None or os.path.exists(value):
        return value
    return _resolver(match["scheme"], value)(value)
