"""``latentserve.v1.ModelControl``: load, unload, reload and list model versions.

The operator's side of the catalog's lifecycle (``service/models/catalog.py``), as Triton's
explicit model-control mode. Authorized like every other RPC (``calls.CallInterceptor``);
errors are ``latentserve.errors`` exceptions that it maps to statuses.
"""

from __future__ import annotations

import grpc

from latentserve.errors import InvalidInput
from latentserve.service.models.catalog import ModelCatalog
from latentserve.service.models.versions import VersionStatus
from latentserve.v1 import model_control_pb2 as pb
from latentserve.v1 import model_control_pb2_grpc as pb_grpc

CONTROL_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ModelControl"].full_name


class ModelControlServicer(pb_grpc.ModelControlServicer):
    """Load / Unload / Reload / List over a ModelCatalog."""

    def __init__(self, catalog: ModelCatalog) -> None:
        self.catalog = catalog

    def _reply(self, statuses: list[VersionStatus]) -> pb.ModelControlResponse:
        newest = self.catalog.newest_refs()
        return pb.ModelControlResponse(models=[
            pb.ModelVersionState(ref=v.ref, state=v.state.value, message=v.message,
                                 newest=v.ref in newest) for v in statuses])

    @staticmethod
    def _model(request: pb.ModelControlRequest) -> str:
        if not request.model:
            raise InvalidInput("name a model: NAME or NAME:VERSION")
        return request.model

    def Load(self, request: pb.ModelControlRequest,
             context: grpc.ServicerContext) -> pb.ModelControlResponse:
        return self._reply([self.catalog.load(self._model(request))])

    def Unload(self, request: pb.ModelControlRequest,
               context: grpc.ServicerContext) -> pb.ModelControlResponse:
        return self._reply(self.catalog.unload(self._model(request)))

    def Reload(self, request: pb.ModelControlRequest,
               context: grpc.ServicerContext) -> pb.ModelControlResponse:
        return self._reply([self.catalog.reload(self._model(request))])

    def List(self, request: pb.ModelControlListRequest,
             context: grpc.ServicerContext) -> pb.ModelControlResponse:
        return self._reply(self.catalog.statuses())


def add_model_control(catalog: ModelCatalog, server: grpc.Server) -> str:
    """Register the servicer on ``server``; returns its full service name."""
    pb_grpc.add_ModelControlServicer_to_server(ModelControlServicer(catalog), server)
    return CONTROL_SERVICE_NAME
