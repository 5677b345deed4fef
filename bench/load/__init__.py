"""Load generators: closed loop with wrk (closedloop.py, wrk/pings.lua), open loop in
Python worker processes (openloop.py, bodies.py), WebSocket subscribers (subscribers.py),
and the simulated drivers' tokens they all use (tokens.py)."""
