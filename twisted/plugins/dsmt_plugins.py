"""twistd dropin for the dsmt daemons: one ServiceMaker per daemon.

``twistd --help`` lists them; ``twistd -n <name> --help`` shows each one's
options.  The makers import their modules lazily so ``twistd --help`` stays
fast and a broken daemon cannot hide the others.
"""
from twisted.application.service import ServiceMaker

psepr_router = ServiceMaker(
    "dsmt PsEPR router",
    "dsmt.server.psepr_router.daemon",
    "PsEPR event router: leases, subtree routing, XMPP-style stream (default port 23345)",
    "psepr-router",
)

pldb = ServiceMaker(
    "dsmt PLDB",
    "dsmt.server.pldb.daemon",
    "PLDB: remembers the last value of every field on chosen PsEPR channels and replays it on query",
    "pldb",
)

dsmt_agent = ServiceMaker(
    "dsmt agent",
    "dsmt.server.agent.daemon",
    "dslice agent: advertises nodes and issues signed tickets over SOAP (HTTP and PsEPR)",
    "dsmt-agent",
)

dsmt_nodemanager = ServiceMaker(
    "dsmt node manager",
    "dsmt.server.nodemanager.daemon",
    "dslice node manager: redeems tickets for leases and creates slivers (SOAP over HTTP and PsEPR)",
    "dsmt-nodemanager",
)

dsmt_nodefarm = ServiceMaker(
    "dsmt node manager farm",
    "dsmt.server.nodemanager.farm",
    "many dslice node managers in one process, each with its own name, state, endpoint and PsEPR instance",
    "dsmt-nodefarm",
)

dsmt_slicemanager = ServiceMaker(
    "dsmt slice manager",
    "dsmt.server.slicemanager.daemon",
    "dslice slice manager: svm's commands over SOAP (HTTP and PsEPR) and the container manager of each slice",
    "dsmt-slicemanager",
)

dsmt_engine = ServiceMaker(
    "dsmt deployment engine",
    "dsmt.server.deployment.daemon",
    "a sliver's deployment engine: deploys, runs and monitors an application, reports reference 000's status "
    "events and obeys APPCONFIG and the other commands (SOAP over HTTP and PsEPR)",
    "dsmt-engine",
)

dsmt_repository = ServiceMaker(
    "dsmt package repository",
    "dsmt.server.deployment.repository",
    "serves a directory's packages listed in its SHA256SUMS index (GET/HEAD, byte ranges, no encodings) "
    "to deployment engines",
    "dsmt-repository",
)
