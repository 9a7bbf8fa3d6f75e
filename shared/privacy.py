"""Right to erasure: the one pseudonym every service puts in place of an erased customer id."""

from __future__ import annotations

import hashlib
import hmac


def pseudonym(secret: str, customer_id: str) -> str:
    """An irreversible, keyed stand-in for an erased customer's id: stable (the same customer
    gets the same pseudonym in every service, so counts and joins still add up) and not
    reversible by hashing guessed ids without the secret."""
    mac = hmac.new(secret.encode(), customer_id.encode(), hashlib.sha256).hexdigest()
    return "erased:" + mac[:32]
