"""Modules: Python extensions called at every SMTP stage and queue event.

The public API is ``empath.modules.api`` (re-exported here); docs/modules.md is the
reference. ``loader`` finds and builds modules, ``runner`` calls them.
"""

# One list of public names, kept in api.py: re-exported as it stands.
from empath.modules import api
from empath.modules.api import *  # noqa: F403

__all__ = list(api.__all__)
