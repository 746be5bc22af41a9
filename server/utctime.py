"""How dslice writes a moment for people: ``YYYY-MM-DD HH:MM:SS UTC`` (the HOWTO's ``svm expirations`` format)."""
import time

__all__ = ["utc_text"]


def utc_text(seconds: int) -> str:
    """POSIX seconds as ``2003-03-05 23:11:01 UTC``."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))
