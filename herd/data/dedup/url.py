"""URL-level dedup: normalize URLs, hash them, and keep the most recent document per URL.

Llama 3 deduplicates at the URL level first, keeping the most recent version of each page
("The Llama 3 Herd of Models", section 3.1.1). Normalization makes trivially different spellings of one page collide:
scheme and host lower-cased, "www." and default ports dropped, fragments and tracking parameters
(utm_*, fbclid, gclid) removed, the remaining query parameters sorted, trailing slashes removed.

Works across workers in two passes: every task records (url key, date) per document, one global
pass picks the survivors (`url_duplicates`), and every task then drops the rest.
"""

from __future__ import annotations

import datetime
import hashlib
import math
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

_TRACKING = ("utm_", "fbclid", "gclid", "mc_cid", "mc_eid")
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def normalize_url(url: str) -> str:
    """Canonical form of a URL, so http://WWW.Example.com:80/a/?b=2&a=1#x == example.com/a?a=1&b=2."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    try:
        parts = urlsplit(url)
    except ValueError:  # malformed (e.g. bad IPv6 brackets): compare the raw string
        return url.lower()
    host = (parts.hostname or "").lower().rstrip(".")
    if host.startswith("www."):
        host = host[4:]
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is not None and str(port) != _DEFAULT_PORTS.get(parts.scheme.lower()):
        host = f"{host}:{port}"
    query = sorted((k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                   if not k.lower().startswith(_TRACKING))
    path = parts.path.rstrip("/") or ""
    # http and https are the same page for dedup purposes: leave the scheme out
    return urlunsplit(("", host, path, urlencode(query), "")).lstrip("/")


def url_key(url: str | None) -> int:
    """64-bit key of a normalized URL; 0 means "no URL" (such documents are never URL-deduped)."""
    if not url:
        return 0
    key = int.from_bytes(hashlib.blake2b(normalize_url(url).encode(), digest_size=8).digest(), "little")
    return key or 1


def parse_date(value: object) -> float:
    """Seconds since the epoch from an ISO-8601 string, a number or a datetime; -inf when missing or unreadable."""
    if value is None or value == "":
        return -math.inf
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime.datetime):
        dt = value
    else:
        text = str(value).strip().replace("Z", "+00:00")
        try:
            dt = datetime.datetime.fromisoformat(text)
        except ValueError:
            return -math.inf
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.timezone.utc)
    return dt.timestamp()


def url_duplicates(keys: np.ndarray, dates: np.ndarray) -> np.ndarray:
    """Boolean mask [n] of documents to drop: all but the most recent per URL key.

    `keys` uint64 [n] (0 = no URL, never dropped), `dates` float64 [n]. Ties on the date keep
    the earliest document (lowest index), so the result does not depend on worker timing.
    """
    keys = np.asarray(keys, dtype=np.uint64)
    dates = np.asarray(dates, dtype=np.float64)
    n = keys.size
    drop = np.zeros(n, dtype=bool)
    if n == 0:
        return drop
    idx = np.arange(n)
    # sort by key, then newest first, then lowest index first: the first of each key group survives
    order = np.lexsort((idx, -dates, keys))
    sorted_keys = keys[order]
    first = np.ones(n, dtype=bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    drop[order[~first]] = True
    drop[keys == 0] = False
    return drop
