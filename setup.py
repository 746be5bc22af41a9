"""Distribution ``dsmt``: the Distributed Service Management Toolkit.

The three code folders of the repository are installed under one import
namespace (``dsmt.transports``, ``dsmt.server``, ``dsmt.client``) so nothing
named plain ``server`` or ``client`` lands in site-packages.  The twistd
dropin ships as package data of Twisted's own ``twisted.plugins`` namespace,
without an ``__init__.py`` of ours (installing one would replace Twisted's).

Python is 3.11 exactly: spyne 2.14 (the SOAP stack of later services) does not
import on 3.12 or newer.  lxml and xmlsec are pinned together because xmlsec
refuses to import when its libxml2 differs from lxml's.
"""
from setuptools import setup

CODE_FOLDERS = {"transports": "dsmt.transports", "server": "dsmt.server", "client": "dsmt.client"}


def _packages():
    import os

    found = []
    for folder, name in CODE_FOLDERS.items():
        for root, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
            if "__init__.py" in files:
                found.append(name + root[len(folder):].replace(os.sep, "."))
    return found


setup(
    name="dsmt",
    version="0.1.0",
    description="Distributed Service Management Toolkit: PsEPR events, SOAP services, slices and deployment",
    python_requires=">=3.11,<3.12",
    # dsmt.wsdl: the published contracts, installed so clients load them (dsmt.server.contracts.wsdl_path)
    packages=_packages() + ["twisted.plugins", "dsmt.wsdl"],
    package_dir={name: folder for folder, name in CODE_FOLDERS.items()} | {"twisted.plugins": "twisted/plugins",
                                                                            "dsmt.wsdl": "wsdl"},
    package_data={"twisted.plugins": ["dsmt_plugins.py"], "dsmt.wsdl": ["*.wsdl", "*.xsd"]},
    install_requires=[
        "Twisted==26.10.0",
        "lxml==6.1.3",
        "xmlsec==1.3.17",
        "cryptography>=44",
        "treq==26.7.0",
        "zeep==4.3.3",
        "spyne==2.14.0",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "psutil>=5.9"],
    },
    entry_points={
        "console_scripts": [
            "psepr = dsmt.client.psepr_cli:main",
            "dsmt-pki = dsmt.client.dsmt_pki:main",
            "svm = dsmt.client.svm:main",
            "dsmtc = dsmt.client.dsmtc:main",
            "dsmt-testbed = dsmt.client.testbed:main",
        ],
    },
)
