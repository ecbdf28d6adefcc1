"""Operating-system resources a node needs before it serves peers: open-file headroom.

Why: every connection, link, checkpoint and log file costs a file descriptor, and the common soft
limit of 1,024 is below what a node with the front door's default caps may hold. A process may
raise its own soft limit up to the hard limit without privileges, so the node does that at start
and says, once, what to change when even the hard limit is too low.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from p2pfl.transport.frontdoor import DoorLimits

__all__ = [
    "FILES_MARGIN",
    "ensure_fd_headroom",
    "fd_need",
]

log = logging.getLogger("p2pfl.resources")

# Descriptors besides connections: the interpreter and torch, the event loop, mDNS sockets, the
# metrics / checkpoint / model files, the door's spare descriptor, and room for a few reconnects.
FILES_MARGIN = 128


def fd_need(limits: DoorLimits, links: int, margin: int = FILES_MARGIN) -> int:
    """Descriptors a node may hold at once: the door's pending and session caps, one per outgoing
    link to a neighbour's broker, and `margin` for everything else."""
    return limits.max_pending + limits.max_sessions + max(links, 0) + margin


def ensure_fd_headroom(need: int) -> int:
    """Raise the soft RLIMIT_NOFILE to `need` (at most the hard limit) and return the soft limit now.

    The soft limit is raised no further than `need`: code that still uses select() cannot handle
    descriptors above 1,023, so a larger limit only moves where such code breaks. One warning,
    saying what to change, when the limit stays below `need`.
    """
    try:
        import resource
    except ImportError:  # not a POSIX system: nothing to raise, nothing to tell
        return need
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return need if soft == resource.RLIM_INFINITY else soft
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # e.g. macOS caps below an "unlimited" hard limit
            log.debug("could not raise the open-file limit to %d: %s", target, exc)
    if soft < need:
        log.warning(
            "open-file limit is %d, below the %d this node may need (connections, links, files): "
            "raise it with `ulimit -n %d` before starting (LimitNOFILE=%d under systemd), "
            "or lower the front door's max_pending / max_sessions",
            soft,
            need,
            need,
            need,
        )
    return soft
