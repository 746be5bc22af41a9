"""What every SOAP transport shares: the server core, WS-Addressing, zeep support.

``core`` drives spyne on bytes in / bytes out; ``addressing`` reads and writes
WS-Addressing 1.0 headers; ``zeepsupport`` builds zeep clients and the binding
classes that accept dsmt's transport URIs.  The transports themselves live next
to this package: ``dsmt.transports.http`` (and SOAP over PsEPR).
"""
