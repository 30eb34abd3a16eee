"""Helpers shared by the tests: certificates, load generation, Redis Cluster
and Sentinel processes, billing events, clocks and the fixtures that start
real servers."""
