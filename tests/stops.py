"""A stop request for tests: stop a training run at a chosen batch."""


class StopAtCheck:
    """A stop request that turns on at the n-th time the loop asks (once per batch)."""

    def __init__(self, n: int) -> None:
        self.left = n

    @property
    def requested(self) -> bool:
        self.left -= 1
        return self.left < 0
