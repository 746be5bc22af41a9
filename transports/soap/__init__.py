"""What every SOAP transport shares: the server core, WS-Addressing, zeep support.

``core`` drives spyne on bytes in / bytes out; ``addressing`` reads and writes
WS-Addressing 1.0 headers; ``zeepsupport`` builds zeep clients and the binding
classes that accept dsmt's transport URIs.  The transports themselves live next
to this package: ``dsmt.transports.http`` (and SOAP over PsEPR).

The transport URIs are defined here, not in ``core``, so that client code
(``zeepsupport``) can name them without importing spyne.
"""

#: WSDL 1.1 binding transport URI of SOAP over HTTP (the SOAP 1.2 binding of WSDL 1.1 uses it too).
HTTP_TRANSPORT = "http://schemas.xmlsoap.org/soap/http"
#: WSDL binding transport URI of SOAP over PsEPR, dsmt's own (zeep needs ``zeepsupport.binding_classes``).
PSEPR_TRANSPORT = "http://dsmt.org/ns/soap/transport/psepr"
