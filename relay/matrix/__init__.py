"""Matrix: an application service that turns the homeserver's redactions into ``message.revoked`` events.

``auth`` checks the homeserver's token, ``normalize`` (pure) reads a transaction, ``ingress`` is the
endpoint, ``transactions`` remembers the transactions answered, ``registration`` prints the file
the homeserver loads. See docs/matrix.md.
"""
