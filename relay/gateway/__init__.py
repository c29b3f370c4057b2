"""The recall gateway's Tencent side: UserSigs, reading Tencent's answers, the rate limit and the
REST client for the three recall APIs. The gateway asks Tencent to recall; the callback joins later."""
