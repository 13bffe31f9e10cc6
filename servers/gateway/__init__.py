"""The optional gateway: one URL in front of every server modelctl runs, routed by `model`.

Run it with `python -m servers.gateway --state-dir DIR`; modelctl runs it for a profile's
`gateway:` key. It reads the supervisor's records (never imports modelctl's supervisor or torch)
and forwards each request to the server's own address, streaming both ways.
"""
