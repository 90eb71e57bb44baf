"""Per-item errors of bulk jobs on the wire: a bad input fails its item only.

Under ``OnItemError.PER_ITEM`` (the default) SubmitJob turns an input it refuses on
arrival into an ``ItemFailure`` in the chunk's payload (``chunk_payload``), a worker does
the same for a code it cannot decode, and FetchResults hands each failed item back as an
``ItemError`` in its slot (``with_item_errors``): the status code and message the unary
Compress or Reconstruct RPC gives for that item sent alone, found through the one
mapping ``service.errors.status_for``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from latentserve.errors import InvalidInput
from latentserve.service.server.errors import status_for
from latentserve.v1 import jobs_pb2 as pb
from latentserve.worker.jobqueue.packing import pack_any_images, pack_failures, pack_items
from latentserve.worker.jobqueue.records import ItemFailure, JobKind, OnItemError

POLICIES = {pb.ON_ITEM_ERROR_UNSPECIFIED: OnItemError.PER_ITEM,
            pb.ON_ITEM_ERROR_PER_ITEM: OnItemError.PER_ITEM,
            pb.ON_ITEM_ERROR_FAIL_FAST: OnItemError.FAIL_FAST}
POLICY_PB = {OnItemError.PER_ITEM: pb.ON_ITEM_ERROR_PER_ITEM,
             OnItemError.FAIL_FAST: pb.ON_ITEM_ERROR_FAIL_FAST}


def policy_of(spec: pb.JobSpec) -> OnItemError:
    """The spec's OnItemError (unset: PER_ITEM); InvalidInput for an unknown value."""
    policy = POLICIES.get(spec.on_item_error)
    if policy is None:
        raise InvalidInput(f"JobSpec.on_item_error {spec.on_item_error} is not one of "
                           "PER_ITEM (1) or FAIL_FAST (2) (0 = PER_ITEM)")
    return policy


def chunk_payload(kind: JobKind, part: Sequence[Any],
                  shape: tuple[int, int, int] | None) -> bytes:
    """A chunk's inputs (images of ``shape``, or of any size for an any-size model's
    (C, 0, 0); or codes; an ItemFailure where one was refused on arrival) as one Redis
    value, refused items holding placeholders."""
    failures = {i: x for i, x in enumerate(part) if isinstance(x, ItemFailure)}
    if kind is JobKind.COMPRESS:
        assert shape is not None
        # Compressed like any image; its code is dropped. Any size: a 1x1 placeholder.
        blank = np.zeros((shape[0], shape[1] or 1, shape[2] or 1), np.uint8)
        inner = pack_any_images([blank if i in failures else x for i, x in enumerate(part)])
    else:
        inner = pack_items([b"" if i in failures else x for i, x in enumerate(part)])
    return pack_failures(inner, failures)


def item_error(index: int, failure: ItemFailure) -> pb.ItemError:
    """One failed item's status, as the unary RPC would give it."""
    code, message = status_for(failure.exception())
    if code.name == "INTERNAL":  # a class this build does not know: keep what was said
        return pb.ItemError(index=index, code="UNKNOWN", message=failure.message)
    return pb.ItemError(index=index, code=code.name, message=message)


def with_item_errors(msg: pb.JobResults, failures: dict[int, ItemFailure]) -> pb.JobResults:
    """``msg`` with its failed items' slots emptied and their ItemErrors listed."""
    if not failures:
        return msg
    slots = msg.codes if len(msg.codes) else msg.images
    for j in range(len(slots)):
        failure = failures.get(msg.start + j)
        if failure is None:
            continue
        if len(msg.codes):
            msg.codes[j] = b""
        else:
            msg.images[j].Clear()
        msg.errors.append(item_error(msg.start + j, failure))
    return msg
