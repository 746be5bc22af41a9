"""The dsmt services (PLDB first; agent, node manager, slice manager, deployment engine follow)."""
