"""The sans-I/O inference engine: signal parameters, estimators, the stall
tracker, the flow table. Pure computation over timestamps; no I/O, no clocks."""
