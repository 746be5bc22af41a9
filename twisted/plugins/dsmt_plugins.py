"""twistd dropin for the dsmt daemons: one ServiceMaker per daemon.

``twistd --help`` lists them; ``twistd -n <name> --help`` shows each one's options.
"""
