"""Tencent Cloud Chat (Tencent IM): the callback endpoint, its auth, normalization, send records
and samples. One provider among several; the shared delivery core never imports it."""
