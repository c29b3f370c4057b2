"""The recall gateway: moderation tools request recalls here (HTTP API or command queue); the relay
records each request, asks Tencent's REST API to recall (UserSigs, the rate limit, reading Tencent's
answers), and joins Tencent's recall callback to the record so the ``message.revoked`` event
carries the reason and the moderator."""
