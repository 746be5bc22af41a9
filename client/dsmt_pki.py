"""``dsmt-pki``: a small CA for dsmt's signed SOAP messages (WS-Security X.509).

::

    dsmt-pki ca DIR --name "dsmt test CA" [--key rsa|ec] [--days N] [--path-length 0|1]
    dsmt-pki issue DIR --service NAME [--dns HOST]... [--key rsa|ec] [--days N]
    dsmt-pki issue DIR --user NAME [--key rsa|ec] [--days N]
    dsmt-pki show CERT
    dsmt-pki verify CERT --ca CA.pem [--purpose client|server] [--dns HOST]

``ca`` writes ``DIR/ca.pem`` and ``DIR/ca.key``; ``issue`` writes
``DIR/service-NAME.pem|.key`` (serverAuth + clientAuth, the DNS names as
subjectAltName) or ``DIR/user-NAME.pem|.key`` (clientAuth).  Keys are RSA 3072
by default or EC P-256, mode 0600; nothing is ever overwritten.  A service
trusts ``DIR/ca.pem`` and signs with its own pair; a user signs with theirs.

Exit status: 0 success; 1 the operation failed (file exists, no CA, unreadable
file, certificate not valid); 2 usage error.
"""
from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    from dsmt.transports.soap.pki import CA_VALIDITY_DAYS, DEFAULT_KEY_TYPE, KEY_TYPES, LEAF_VALIDITY_DAYS

    parser = argparse.ArgumentParser(prog="dsmt-pki", description="A small CA for dsmt services and users.",
                                     epilog="Exit status: 0 ok, 1 failed, 2 usage.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ca", help="create a CA in DIR (ca.pem, ca.key)")
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--name", required=True, help='the CA\'s common name, e.g. "dsmt test CA"')
    p.add_argument("--key", choices=KEY_TYPES, default=DEFAULT_KEY_TYPE, help="rsa (3072 bits, default) or ec (P-256)")
    p.add_argument("--days", type=int, default=CA_VALIDITY_DAYS, help=f"validity (default {CA_VALIDITY_DAYS})")
    p.add_argument("--path-length", type=int, choices=(0, 1), default=0,
                   help="0: signs end-entity certificates only (default); 1: may sign one level of sub-CA")

    p = sub.add_parser("issue", help="issue a service or user certificate from the CA in DIR")
    p.add_argument("directory", metavar="DIR")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--service", metavar="NAME", help="a service certificate (serverAuth + clientAuth)")
    who.add_argument("--user", metavar="NAME", help="a user certificate (clientAuth)")
    p.add_argument("--dns", action="append", default=[], metavar="HOST",
                   help="a DNS name of the service (repeat for several)")
    p.add_argument("--key", choices=KEY_TYPES, default=DEFAULT_KEY_TYPE, help="rsa (3072 bits, default) or ec (P-256)")
    p.add_argument("--days", type=int, default=LEAF_VALIDITY_DAYS, help=f"validity (default {LEAF_VALIDITY_DAYS})")

    p = sub.add_parser("show", help="print a certificate's subject, issuer, validity, usages and fingerprint")
    p.add_argument("certificate", metavar="CERT")

    p = sub.add_parser("verify", help="check a certificate against trusted CA certificates, now")
    p.add_argument("certificate", metavar="CERT")
    p.add_argument("--ca", action="append", required=True, metavar="CA.pem", help="trusted CA file (repeatable)")
    p.add_argument("--purpose", choices=("client", "server"), default="client",
                   help="client: may sign requests (clientAuth); server: may sign replies (serverAuth)")
    p.add_argument("--dns", metavar="HOST", help="the certificate must name this host")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from dsmt.transports.soap import pki

    try:
        if args.command == "ca":
            files = pki.create_ca(args.directory, args.name, key_type=args.key, path_length=args.path_length,
                                  days=args.days)
            print(f"CA certificate: {files.certificate}\nCA key:         {files.key} (keep it secret)")
        elif args.command == "issue":
            kind, name = ("service", args.service) if args.service is not None else ("user", args.user)
            files = pki.issue_certificate(args.directory, kind, name, dns_names=args.dns, key_type=args.key,
                                          days=args.days)
            print(f"certificate: {files.certificate}\nkey:         {files.key} (mode 0600)")
        elif args.command == "show":
            for number, certificate in enumerate(pki.load_certificates(args.certificate)):
                print(("\n" if number else "") + pki.describe_certificate(certificate))
        elif args.command == "verify":
            trust = pki.TrustStore.from_files(*args.ca)
            certificate = pki.load_certificate(args.certificate)
            purpose = pki.Purpose.CLIENT if args.purpose == "client" else pki.Purpose.SERVER
            trust.validate(certificate, purpose, dns_name=args.dns)
            print(f"{pki.subject_text(certificate)}: valid for {purpose.value}"
                  + (f" as {args.dns}" if args.dns else ""))
    except pki.CertificateError as exc:
        print(f"dsmt-pki: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except pki.PkiArgumentError as exc:
        print(f"dsmt-pki: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except pki.PkiError as exc:
        print(f"dsmt-pki: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
