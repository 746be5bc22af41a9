"""A refusal with a machine-readable code and a precise reason, shared by the services.

Services refuse requests for reasons a caller must tell apart (a ticket's
``expired`` against ``wrong-node``, a node manager's ``capacity`` against
``policy``): ``code`` is the stable word the SOAP faults and ``svm`` output
carry, ``reason`` the sentence a person reads.
"""


class Refusal(Exception):
    """``code`` (a short stable word) and ``reason`` (a precise sentence); ``str()`` is ``"code: reason"``."""

    def __init__(self, code: str, reason: str):
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.code}: {self.reason}"
