"""The one exception the media decoders raise, with a short reason the loader counts skipped samples by."""

from __future__ import annotations

DECODE_REASONS = ("empty", "undecodable", "truncated", "oversized")
"""Every reason a sample can be skipped for at decode time (stable metric keys)."""


class DecodeError(Exception):
    """A sample that cannot be decoded; `reason` is one of DECODE_REASONS, `detail` is for logs."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in DECODE_REASONS:
            raise ValueError(f"reason: must be one of {DECODE_REASONS}, got {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple:
        # DataLoader workers pickle exceptions back to the main process; keep both fields.
        return (type(self), (self.reason, self.detail))
