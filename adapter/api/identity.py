"""Who is calling (see adapter.identity; kept here for the API's imports)."""
from adapter.identity import ANONYMOUS, caller_identity

__all__ = ["ANONYMOUS", "caller_identity"]
