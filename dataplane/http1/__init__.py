"""HTTP/1.1: head scanning, the two head codecs, strict body framing and message semantics.

The codecs (httptools, h11) parse heads only. Everything that decides where a message
ends (Content-Length, chunked) is turnout's own code in ``framing.py``, and every head is
scanned byte by byte in ``scan.py`` before a codec sees it, so both codecs accept exactly
the same byte streams and no two parsers can disagree on a request's length.
"""
