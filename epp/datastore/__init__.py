"""The pool of endpoints and what is known about each of them."""

from epp.datastore.endpoint import Endpoint, Metrics
from epp.datastore.pool import Pool

__all__ = ["Endpoint", "Metrics", "Pool"]
