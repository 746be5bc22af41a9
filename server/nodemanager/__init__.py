"""Node manager: redeems agent tickets into leases on one node (issue 4, "Node manager").

:mod:`.store` keeps leases in SQLite; :mod:`.core` is the pure admission/lease logic.
"""
