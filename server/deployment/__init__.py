"""The deployment engine on each sliver: descriptors, and the management components it composes.

Foundations, one concern per module: ``descriptor`` (the deployment descriptor, its schema
``wsdl/deployment-descriptor.xsd`` and its semantic rules), ``fetch`` (packages downloaded with
SHA-256 verification and resume), ``unpack`` (tar and zip extracted without ever writing outside
the destination), ``checksum`` (SHA-256 digests).
"""
