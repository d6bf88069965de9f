"""Deprecated alias of `k2_core.builtin_plugin` (k2-core's built-in plugin), for one release.

The built-in plugin was renamed so that it no longer sits beside `k2_core.plugins`, the plugin
manager, under a name one letter away. `import k2_core.plugin` gives the same module object.
"""

from __future__ import annotations

import sys
import warnings

from . import builtin_plugin

warnings.warn(
    "k2_core.plugin was renamed k2_core.builtin_plugin; the old name goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = builtin_plugin
