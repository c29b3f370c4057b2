"""revoke-relay: Tencent IM recall callbacks → normalized events → confirmed RabbitMQ publishes."""

__version__ = "0.1.0"
