"""The consumer kit: apply each of the relay's events once, from a queue or the history stream
(docs/consuming.md). ``PostgresInbox`` needs ``pip install 'revoke-relay[consumer]'``."""

from relay.consumer.event import Event, EventError, Operator
from relay.consumer.inbox import Inbox, PostgresInbox
from relay.consumer.run import Consumer, ConsumerError, Handler, Stats

__all__ = [
    "Consumer",
    "ConsumerError",
    "Event",
    "EventError",
    "Handler",
    "Inbox",
    "Operator",
    "PostgresInbox",
    "Stats",
]
