"""A run's processes: the typed control protocol (`protocol`), the coordinator's state machine
(`coordinator`, with `inbox`, `membership`, `records`, `schedule`, `assignment`, `serving`, `summary`),
the client (`client`; `single` is the client at world size 1, `testnet train`), the launch plan
(`plan`), the launcher and process supervision (`launcher`, `processes`).
"""
