"""WS-Security sign and verify cost per message (``dsmt.transports.soap.wssec``).

For RSA-3072 and EC P-256 keys and a small SOAP 1.1 request (~700 bytes: a
Body of two fields and the four WS-Addressing headers zeep sends, so six
signed references), prints the median and 90th percentile, in microseconds,
of:

* ``sign`` — :meth:`Signer.sign`: bytes in, signed bytes out;
* ``verify`` — :meth:`Verifier.verify` on the bytes (safe parse included),
  each message a new one (replay cache on, certificate already validated once);
* ``verify, core's parse`` — the same with the tree the SOAP core already
  parsed (``parsed=``), i.e. what the core's filter hook adds per request;
* for reference, zeep's ``BinarySignature`` (SHA-256 configured; it signs
  Body and Timestamp only) ``apply`` + serialise, and parse + ``verify``.

The bar (issue "WS-Security with xmlsec"): verify ≤ 0.3 ms per message.

Run: ``PYTHONPATH=.dev .venv/bin/python bench/wssec.py [--count N] [--profile]``
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import tempfile
import time
import uuid

from cryptography.hazmat.primitives import serialization
from lxml import etree

from dsmt.transports.soap import pki
from dsmt.transports.soap.wssec import SOAP11_NS, WSA_NS, Signer, Verifier
from dsmt.transports.xmlsafe import parse_xml

#: A fixed instant; every message is signed at it and verified a second later.
NOW = time.time()


def envelope(number: int) -> bytes:
    """A small request as zeep sends it: WS-Addressing MessageID, To, Action, ReplyTo and a short Body."""
    return (f'<soap-env:Envelope xmlns:soap-env="{SOAP11_NS}"><soap-env:Header>'
            f'<wsa:Action xmlns:wsa="{WSA_NS}">http://dsmt.org/ns/nodemanager/createSliver</wsa:Action>'
            f'<wsa:MessageID xmlns:wsa="{WSA_NS}">urn:uuid:{uuid.UUID(int=number)}</wsa:MessageID>'
            f'<wsa:To xmlns:wsa="{WSA_NS}">http://node1.example/soap/nodemanager</wsa:To>'
            f'<wsa:ReplyTo xmlns:wsa="{WSA_NS}"><wsa:Address>http://www.w3.org/2005/08/addressing/anonymous'
            '</wsa:Address></wsa:ReplyTo></soap-env:Header><soap-env:Body>'
            '<ns0:createSliver xmlns:ns0="http://dsmt.org/ns/nodemanager"><ns0:slice>xyz1</ns0:slice>'
            '<ns0:ticket>T-42</ns0:ticket></ns0:createSliver></soap-env:Body></soap-env:Envelope>').encode()


def timed(function, items) -> list[float]:
    """Microseconds of ``function(item)`` for each item."""
    samples = []
    clock = time.perf_counter_ns
    for item in items:
        start = clock()
        function(item)
        samples.append((clock() - start) / 1000)
    return samples


def report(label: str, samples: list[float]) -> None:
    ordered = sorted(samples)
    median, p90 = statistics.median(ordered), ordered[len(ordered) * 9 // 10]
    print(f"  {label:34s} median {median:8.1f} µs   p90 {p90:8.1f} µs")


def zeep_reference(key, cert, messages: list[bytes]) -> None:
    try:
        import xmlsec
        from zeep.wsse.signature import BinarySignature
    except ImportError as exc:  # pragma: no cover
        print(f"  (zeep reference skipped: {exc})")
        return
    with tempfile.TemporaryDirectory() as directory:
        key_path, cert_path = os.path.join(directory, "key.pem"), os.path.join(directory, "cert.pem")
        with open(key_path, "wb") as handle:
            handle.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        with open(cert_path, "wb") as handle:
            handle.write(cert.public_bytes(serialization.Encoding.PEM))
        method = xmlsec.Transform.RSA_SHA256 if "RSA" in type(key).__name__ else xmlsec.Transform.ECDSA_SHA256
        zeep_signature = BinarySignature(key_path, cert_path, signature_method=method,
                                         digest_method=xmlsec.Transform.SHA256)
        signed = []

        def sign(data):
            tree, _ = zeep_signature.apply(etree.fromstring(data), {})
            signed.append(etree.tostring(tree))

        report("zeep BinarySignature apply", timed(sign, messages))
        report("zeep BinarySignature verify", timed(lambda data: zeep_signature.verify(etree.fromstring(data)),
                                                    signed))


def run(key_type: str, count: int, ca, profile: bool) -> None:
    key, cert = pki.make_certificate(ca[0], ca[1], "user", f"bench-{key_type}", key_type=key_type, now=NOW)
    signer = Signer(key, cert, clock=lambda: NOW)
    verifier = Verifier(pki.TrustStore([ca[1]]), clock=lambda: NOW + 1)
    messages = [envelope(number) for number in range(count)]
    print(f"{'RSA-3072' if key_type == 'rsa' else 'EC P-256'} ({count} messages, {len(messages[0])} bytes unsigned)")
    report("sign", timed(signer.sign, messages))
    signed = [signer.sign(message) for message in messages]
    verifier.verify(signer.sign(envelope(count)))   # warm: the certificate is validated and cached once
    report("verify", timed(verifier.verify, signed))
    fresh = Verifier(pki.TrustStore([ca[1]]), clock=lambda: NOW + 1)
    fresh.verify(signer.sign(envelope(count)))
    trees = [parse_xml(data, max_bytes=1 << 20) for data in signed]
    pairs = list(zip(signed, trees))
    report("verify, core's parse", timed(lambda pair: fresh.verify(pair[0], parsed=pair[1]), pairs))
    print(f"  signed size {len(signed[0])} bytes")
    zeep_reference(key, cert, messages)
    if profile:
        third = Verifier(pki.TrustStore([ca[1]]), clock=lambda: NOW + 1)
        third.verify(signer.sign(envelope(count)))
        profiler = cProfile.Profile()
        profiler.enable()
        for data in signed:
            third.verify(data)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


def main() -> None:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--count", type=int, default=2000, help="messages per measurement")
    options.add_argument("--profile", action="store_true", help="print a cProfile of verification")
    args = options.parse_args()
    ca = pki.make_ca("bench CA", key_type="ec", now=NOW - 86400)
    for key_type in ("ec", "rsa"):
        run(key_type, args.count, ca, args.profile)
    print(f"load average: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
