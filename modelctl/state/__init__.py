"""The state directory: the store and its records, the states and the lifecycle's moves, the restart
policy, legacy layouts and machine-wide port leases."""
