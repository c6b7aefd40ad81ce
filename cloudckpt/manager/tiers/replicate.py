"""Moving a step's data objects between hosts over the job's coordinator (never a home-made RPC).

Two directions, one mechanism (``Coordinator.transfer``: every sender's buffers to one
receiving rank, sizes agreed beforehand by an all-gather):

- ``replicate``: after a local save, each host sends the data objects it wrote to its
  replica holders, which store them under the same write-unique names;
- ``fetch``: at resume, each host receives the objects it lacks from a host that holds
  them verified.

One ``transfer`` per receiving rank, in rank order on every rank; a rank with nothing to
send passes no buffers. A whole object is sent from a mapping of its file and received straight
into its new file (``HostDirectory.land``): each byte is copied once per side, by the transfer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

from cloudckpt.coordination import Coordinator
from cloudckpt.manager.tiers.holdings import Holdings, Landing

log = logging.getLogger("cloudckpt.manager.tiers")

#: What one sender sends: ``(key, size, ranges)`` - the whole object when ``ranges`` is empty, else
#: only those ``(offset, length)`` ranges of it (the receiver keeps them as pieces of the object).
Item = tuple[str, int, tuple[tuple[int, int], ...]]
#: For each receiving rank: for each sending rank, the items it sends, in order.
Routes = Mapping[int, Mapping[int, Sequence[Item]]]


def move(holdings: Holdings, coordinator: Coordinator, routes: Routes) -> int:
    """Run the transfers ``routes`` describes (identical on every rank); return the bytes this rank received.

    Raises:
        the first error writing what this rank received - after every transfer ran, so that the
        other ranks are not left waiting in one; ``CoordinationError`` when a transfer fails.
    """
    me = coordinator.rank
    received = 0
    failed: Exception | None = None
    for dst in range(coordinator.world_size):
        senders = {src: list(items) for src, items in routes.get(dst, {}).items() if items and src != dst}
        if not senders:
            continue
        # Sent from a copy-on-write mapping of the file (no read into memory first); pieces (small:
        # whole arrays only) read into one array.
        outgoing = [holdings.storage.read_array(key, ranges) if ranges else holdings.storage.map_for_sending(key, size)
                    for key, size, ranges in (senders.get(me, []) if me != dst else [])]
        landings: dict[int, list[Landing | None]] = {}
        incoming: dict[int, list[NDArray[np.uint8]]] = {}
        for src, items in (senders.items() if me == dst else ()):
            for key, size, ranges in items:
                landing = None
                if not ranges:  # a whole object is received straight into its new file
                    try:
                        landing = holdings.storage.land(key, size)
                    except Exception as exc:  # this rank still takes its part in every transfer
                        failed = failed or exc
                landings.setdefault(src, []).append(landing)
                incoming.setdefault(src, []).append(
                    landing.array if landing is not None else
                    np.empty(sum(n for _, n in ranges) if ranges else size, dtype=np.uint8))
        try:
            coordinator.transfer(dst, outgoing, incoming)
        except BaseException:
            for landing in (x for xs in landings.values() for x in xs if x is not None):
                landing.abort()
            raise
        del outgoing
        for src, buffers in incoming.items():
            for (key, size, ranges), buf, landing in zip(senders[src], buffers, landings[src], strict=True):
                try:  # a failed write must not stop this rank's part in the transfers still to come
                    if landing is not None:
                        landing.commit()
                    elif ranges:
                        holdings.storage.put_pieces(key, size, ranges, buf)
                    else:
                        continue  # its landing failed: counted above
                    received += buf.nbytes
                except Exception as exc:
                    failed = failed or exc
        del incoming
    if failed is not None:
        raise failed
    return received


def replicate(holdings: Holdings, coordinator: Coordinator, name: str,
              holders: Sequence[Sequence[int]]) -> dict[str, int]:
    """Send this host's data objects of ``name`` to its replica holders; return key -> writing rank.

    Collective. Before it, each host holds only what it wrote (a fresh step).
    """
    mine = sorted(holdings.data_objects(name).items())
    gathered = [[(str(k), int(s)) for k, s in items] for items in coordinator.all_gather_object(mine)]
    owners = {key: rank for rank, items in enumerate(gathered) for key, _ in items}
    routes: dict[int, dict[int, Sequence[Item]]] = {}
    for src, targets in enumerate(holders):
        for dst in targets:
            routes.setdefault(dst, {})[src] = [(key, size, ()) for key, size in gathered[src]]
    received = move(holdings, coordinator, routes)
    if received:
        log.debug("local tier: rank %d holds %d replica bytes of %s", coordinator.rank, received, name)
    return owners
