"""How the run's `code` rewards isolate model-written code: refuse weak isolation, log it."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from k2_core.errors import ConfigError

from ..sandbox import SandboxLimits, protections
from .base import Reward

_log = logging.getLogger(__name__)
PARAM = "sandbox.protections"
# without these, a loopback socket connects and the host's files are readable
_REQUIRED = ("net_namespace", "pid_namespace", "private_root")


def sandbox_protections(rewards: Mapping[str, Reward], *, allow_weak_isolation: bool) -> str:
    """The protections of the sandboxed rewards by task ('' when none runs code); a ConfigError
    for one without namespaces unless `allow_weak_isolation`."""
    found = []
    for task, reward in sorted(rewards.items()):
        limits = getattr(getattr(reward, "options", None), "sandbox", None)
        if not isinstance(limits, SandboxLimits):
            continue
        prot = protections(limits)
        missing = [p for p in _REQUIRED if p not in prot]
        if missing and not allow_weak_isolation:
            raise ConfigError(
                f"plugins.rl.tasks.{task}.reward_options.sandbox.isolation: "
                f"{limits.isolation!r} would run model-written code without {', '.join(missing)} "
                "(a loopback socket connects, host files are readable); use 'namespaces' (needs "
                "root and util-linux unshare) or set plugins.rl.allow_weak_isolation=true"
            )
        found.append(f"{task}: {','.join(prot)}")
    return "; ".join(found)


def log_protections(run: Any, value: str) -> None:
    """Log `value` as the run param sandbox.protections on the run's tracker, when it has one."""
    hooks = run.plugins.pm.get_plugin("k2-tracker")
    tracker = getattr(hooks, "tracker", None)
    client, run_id = getattr(tracker, "client", None), getattr(tracker, "run_id", None)
    if not value or client is None or not run_id:
        return
    try:
        client.log_param(run_id, PARAM, value[:6000])
    except Exception as e:  # noqa: BLE001 - e.g. a resumed run that logged another value
        _log.warning("could not log %s: %s", PARAM, e)
