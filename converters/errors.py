"""The one error every decoder in ``converters`` raises for bytes it cannot accept."""


class CodecError(ValueError):
    """Bytes that cannot be decoded; ``reason`` says why in a few words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
