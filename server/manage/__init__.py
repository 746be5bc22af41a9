"""Manageability every dsmt daemon mounts: WSDM (MUWS properties over WS-ResourceProperties 1.2).

``wsdm`` holds the pure resource model and the SOAP service; ``daemons`` the
router's and PLDB's resources and the ``--manage-http`` / ``--manage-psepr``
mounts.  README "Manageability" shows it in use; ``wsdl/manageability.wsdl``
is the published contract (``python wsdl/generate.py`` rewrites it).
"""
from dsmt.server.manage.wsdm import (
    MANAGE_NS, MUWS1_NS, MUWS2_NS, RP_NS, SERVICE_NAME, ManageableResource, OperationalStatus, StaticResource,
    manageability_core, manageability_service, property_document, resource_id_for)

__all__ = ["MANAGE_NS", "MUWS1_NS", "MUWS2_NS", "RP_NS", "SERVICE_NAME", "ManageableResource", "OperationalStatus",
           "StaticResource", "manageability_core", "manageability_service", "property_document", "resource_id_for"]
