"""Server reflection in both versions: ``grpc.reflection.v1`` and ``v1alpha``.

grpcio-reflection implements only v1alpha, while current tools ask for v1 first and
log an error (or give up) when it is missing. The two versions' messages are the same
fields under another package name, so v1 is served by re-reading each message as its
v1alpha twin (and each answer back): one implementation, two names.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as alpha_pb2

from latentserve.v1 import grpc_reflection_v1_pb2 as v1_pb2
from latentserve.v1 import grpc_reflection_v1_pb2_grpc as v1_grpc

V1_SERVICE_NAME = v1_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name
V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME


class ReflectionV1(v1_grpc.ServerReflectionServicer):
    """grpc.reflection.v1 over grpcio-reflection's v1alpha servicer."""

    def __init__(self, service_names: Sequence[str]) -> None:
        self._alpha = reflection.ReflectionServicer(service_names)

    def ServerReflectionInfo(self, request_iterator: Iterable[v1_pb2.ServerReflectionRequest],
                             context: grpc.ServicerContext
                             ) -> Iterator[v1_pb2.ServerReflectionResponse]:
        requests = (alpha_pb2.ServerReflectionRequest.FromString(r.SerializeToString())
                    for r in request_iterator)
        for answer in self._alpha.ServerReflectionInfo(requests, context):
            yield v1_pb2.ServerReflectionResponse.FromString(answer.SerializeToString())


def enable_reflection(service_names: Sequence[str], server: grpc.Server) -> None:
    """Serve reflection v1 and v1alpha on ``server``, listing ``service_names`` and both."""
    names = [*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    v1_grpc.add_ServerReflectionServicer_to_server(ReflectionV1(names), server)
